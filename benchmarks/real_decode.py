"""Decoding the real model: our bundles against transformers' own ``generate`` and llama.cpp, on one CPU, in one run.

    python -m benchmarks.real_decode                 # SmolLM2-135M-Instruct: fp32 + int8 bundles, ~5 min first run
    python -m benchmarks.real_decode --quick         # fewer rounds and tokens

Rows (each greedy, the same chat prompt, ``--new`` tokens with no early stop, default threads of each engine):

- ``transformers``: ``AutoModelForCausalLM.generate`` on the fp32 model (torch, its own KV cache);
- ``bundle fp32`` / ``bundle int8``: ``Runtime.load`` of the packager's bundles (``package``; int8: ``quantize``
  first, the live u8 copy with two-byte activations), ``rt.generate`` with the KV cache; built once into
  ``--cache`` and reused;
- ``llama.cpp Q4_1``: llama-cpp-python (an optional peer: skipped, with the reason, where it is not installed; it
  builds from PyPI's source package) on the GGUF file the model ships in (``pretrained.gguf_file``): 4-bit
  weights, so faster by design; our rows are fp32 and int8.

Per row, medians over ``--rounds`` interleaved rounds (the rows take turns): the first token (prompt prefill and
one token), the whole generation's tokens/s with prefill included (``new / total``), and the decode rate (the
tokens after the first, per second of the time they added). On the bundles also the first token right after a
switch to a SHiRA adapter (1% random entries on the target linears; the switch itself excluded and shown on
its own) against the first token without one: live weights need no rebuild or repack after a switch. A
process's first switch also pays, once, the live probe and the one-token session's creation (shown apart).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from shira_runtime import Runtime, pretrained
from shira_runtime.table import print_table

from benchmarks.common import progress

CHAT = "What is the capital of France? Answer in one sentence."


def cache_dir() -> Path:
    return pretrained.cache_root().parent / "bench" / "real_decode"


def bundle(name: str, fmt: str, root: Path) -> Path:
    """The packager's bundle of model ``name`` in ``fmt`` (fp32 or int8), with one random SHiRA adapter ``a``."""
    out = root / f"{name}-{fmt}"
    if (out / "manifest.json").is_file():
        return out
    from shira_runtime import quantize
    from shira_runtime.exporters.package import package
    from shira_runtime.models import TARGETS, load_base
    from shira_runtime.synthetic import random_shira

    progress(f"packaging the {fmt} bundle of {name} into {out} (once)")
    model = load_base(name)
    adapter = random_shira(model, TARGETS, 0.01, seed=1)
    if fmt == "int8":
        quantize(model, "int8")
    return package(model, out, {"a": adapter}, quiet=True)


def llama_cpp_row(name: str, prompt: list[int], threads: int):
    """A generate(n) over llama-cpp-python, or the reason it cannot run."""
    try:
        import llama_cpp
    except ImportError as exc:
        return None, f"llama-cpp-python is not installed ({exc}); pip install llama-cpp-python builds it"
    llm = llama_cpp.Llama(str(pretrained.gguf_file(name)), n_ctx=512, n_threads=threads, verbose=False)

    def generate(n: int) -> list[int]:
        out = []
        for t in llm.generate(prompt, top_k=1, temp=0.0, reset=True):  # greedy; no stop at the end token
            out.append(int(t))
            if len(out) == n:
                break
        return out

    return generate, None


def run(args: argparse.Namespace) -> dict:
    import transformers

    path = pretrained.fetch(args.model)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": CHAT}], add_generation_prompt=True)
    ids = list(ids if isinstance(ids, list) else ids["input_ids"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pt = torch.tensor([ids])

    def hf_gen(n: int):
        with torch.no_grad():
            return hf.generate(pt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)

    gens = {"transformers fp32 (torch)": hf_gen}
    rts = {}
    for fmt in args.formats:
        rt = Runtime.load(bundle(args.model, fmt, args.cache))
        rts[fmt] = rt
        arr = np.array([ids], dtype=np.int64)
        gens[f"bundle {fmt} (onnxruntime)"] = lambda n, rt=rt, arr=arr: rt.generate(
            arr, max_new_tokens=n, eos_token_id=-1
        )
    skipped = {}
    gen, why = llama_cpp_row(args.model, ids, args.threads)
    if gen is None:
        skipped["llama.cpp Q4_1"] = why
    else:
        gens["llama.cpp Q4_1 (llama-cpp-python)"] = gen
    progress(f"timing {len(gens)} rows, {args.rounds} interleaved rounds of {args.new} tokens")
    for g in gens.values():
        g(args.new)  # warm-up
    once = {}
    for fmt, rt in rts.items():  # the first switch's one-time costs (the live probe, the one-token session)
        t0 = time.perf_counter()
        rt.switch("a")
        gens[f"bundle {fmt} (onnxruntime)"](1)
        once[fmt] = (time.perf_counter() - t0) * 1e3
        rt.switch(None)
    first = {k: [] for k in gens}
    total = {k: [] for k in gens}
    after_switch = {f: [] for f in rts}
    switch_ms = {f: [] for f in rts}
    for r in range(args.rounds):
        names = list(gens)
        names = names[r % len(names) :] + names[: r % len(names)]
        for k in names:
            t0 = time.perf_counter()
            gens[k](1)
            first[k].append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            gens[k](args.new)
            total[k].append((time.perf_counter() - t0) * 1e3)
        for fmt, rt in rts.items():  # the first token right after a switch, the switch excluded
            t0 = time.perf_counter()
            rt.switch("a")
            switch_ms[fmt].append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            gens[f"bundle {fmt} (onnxruntime)"](1)
            after_switch[fmt].append((time.perf_counter() - t0) * 1e3)
            rt.switch(None)
    rows = []
    med = statistics.median
    for k in gens:
        added = med(t - f for t, f in zip(total[k], first[k]))
        row = {
            "row": k,
            "first_token_ms": med(first[k]),
            "tokens_per_s": args.new / (med(total[k]) / 1e3),
            "decode_tokens_per_s": (args.new - 1) / (added / 1e3) if added > 0 else None,
        }
        fmt = next((f for f in rts if k == f"bundle {f} (onnxruntime)"), None)
        if fmt:
            row["switch_ms"] = med(switch_ms[fmt])
            row["first_token_after_switch_ms"] = med(after_switch[fmt])
            row["after_switch_x"] = med(a / f for a, f in zip(after_switch[fmt], first[k]))
            row["first_switch_and_token_once_ms"] = once[fmt]
        rows.append(row)
    ref = rows[0]["tokens_per_s"]
    for row in rows:
        row["x_transformers"] = row["tokens_per_s"] / ref
    return {
        "model": args.model,
        "prompt_tokens": len(ids),
        "new": args.new,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "llama_threads": args.threads,
        "rows": rows,
        "skipped": skipped,
    }


def report(doc: dict) -> None:
    print(f"\n# real_decode: {doc['model']}, prompt {doc['prompt_tokens']} tokens, {doc['new']} new tokens (greedy, "
          f"no early stop), medians of {doc['rounds']} interleaved rounds")  # fmt: skip
    print_table(
        ["row", "first token ms", "tok/s (prefill incl.)", "decode tok/s", "x transformers", "switch ms",
         "first token after switch ms", "x without"],
        [
            [r["row"], r["first_token_ms"], r["tokens_per_s"], r["decode_tokens_per_s"], r["x_transformers"],
             r.get("switch_ms"), r.get("first_token_after_switch_ms"), r.get("after_switch_x")]
            for r in doc["rows"]
        ],
    )  # fmt: skip
    for r in doc["rows"]:
        if "first_switch_and_token_once_ms" in r:
            print(
                f"{r['row']}: the first switch and token, once per process (the live probe, the one-token "
                f"session): {r['first_switch_and_token_once_ms']:.0f} ms; the rows above come after it"
            )
    for k, why in doc["skipped"].items():
        print(f"skipped {k}: {why}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.real_decode", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", choices=sorted(pretrained.MODELS))
    p.add_argument("--formats", nargs="+", choices=["fp32", "int8"], default=["fp32", "int8"])
    p.add_argument("--new", type=int, default=32, help="new tokens per generation")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (the others use their defaults)")
    p.add_argument("--cache", type=Path, default=None, help="where the bundles are built once")
    p.add_argument("--quick", action="store_true", help="2 rounds of 8 tokens")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.new = 2, 8
    args.cache = args.cache or cache_dir()
    doc = run(args)
    report(doc)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
