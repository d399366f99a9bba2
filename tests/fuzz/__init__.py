"""Seeded fuzzing of every file the runtime reads: our adapter file, PEFT LoRA directories, ONNX bundles.

    python -m pytest tests/fuzz -q        # counts per family in the terminal summary; -s prints them as they run
    SHIRA_FUZZ_SEED=7 python -m pytest tests/fuzz       # another draw (default 20240611)
    SHIRA_FUZZ_VERBOSE=1 python -m pytest tests/fuzz -s # every case and its outcome
    SHIRA_FUZZ_CASE_SECONDS=10                          # per-case budget (a case past it fails as a hang)

Contract (``harness.py``): each mutated input either raises a documented error (``AdapterFormatError``, which
includes ``BundleError``, ``AdapterMismatchError``, ``AdapterValueError``, ``BaseMismatchError``) whose message
names the mutated file or bundle, or behaves exactly like the unmutated original; the base is never changed.
Layout: ``mutations.py`` (pure bytes/dict mutations, the safetensors layout); seeded families of cases in
``adapter_cases.py`` (our file's bytes, header, tensors), ``metadata_cases.py`` (its metadata),
``lora_cases.py`` (a PEFT LoRA directory), ``bundle_cases.py`` (bundles); ``harness.py`` (the contract, the time
guard, the counts); ``compat.py`` (the one place that imports format internals: the checksums a hostile writer
recomputes).
"""
