"""Generation speed on live weights: a transformers Llama exported with its KV cache, one decode step (one token
after a cache of ``--past`` tokens) and a prefill of ``--prompt`` tokens, the live session against a default
prepacked session of the same graph, interleaved, in one run.

    python -m benchmarks.decode                     # Llama-3.2-1B shapes, fp32 and fp16 (random weights)
    python -m benchmarks.decode --quick             # small preset shapes, few repeats
    python -m benchmarks.decode --dtype int8 --spin # an int8 bundle; and its sessions with spinning threads

Sessions (the same bundle graph, the same thread count, the same inputs):
- live: ``OnnxBackend``'s two sessions over one set of weight buffers: prefill with the weights as GEMM *A*
  operands, one-token steps with the weights as GEMM *B* (onnxruntime's one-row kernel reads them in place);
- default: the weights as initializers (shared with the live arrays, ``add_initializer``), fully optimized and
  prepacked, linears spelled ``Gemm(X, W, transB=1)`` so onnxruntime packs W straight from its stored layout
  (``benchmarks.onnx_live.initializer_graph``).
Both run through an ``IOBinding`` with the inputs as numpy arrays. Ratios are live / default, medians of
interleaved rounds. ``int8``: the fp32 model quantized (``shira_runtime.quantize``), an int8 bundle. The sessions'
intra-op threads sleep between parallel sections, as the runtime's do (``OnnxBackend.open(spin=False)``);
``--spin`` also times both sessions with spinning threads (the ``spinning`` columns), in blocks that alternate
with the sleeping ones (two of each): not in the same rounds, where one session's spinning workers would take the
CPU from the next session timed. Each figure is then the median of its blocks' medians.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
from shira_runtime.exporters import export_onnx
from shira_runtime.kernels.dtypes import BUNDLE, by_short
from shira_runtime.models import PRESETS
from shira_runtime.onnx_backend import OnnxBackend, positions
from shira_runtime.table import print_table

from benchmarks.common import progress
from benchmarks.onnx_live import initializer_graph, session
from benchmarks.switch_rows import hf_llama
from benchmarks.timing import Timing, cycles

DTYPES = {d: by_short(d).torch for d in BUNDLE} | {"int8": torch.float32}  # int8: the fp32 model quantized
BLOCKS = 2  # with --spin: blocks of each kind of session, alternating


@dataclass(frozen=True)
class Config:
    preset: str
    dtypes: tuple[str, ...]
    past: int
    prompt: int
    repeats: int
    threads: int
    spin: bool = False  # also time every session with spinning intra-op threads


@dataclass(frozen=True)
class Row:
    dtype: str
    phase: str  # decode_step / prefill_<n>
    live_ms: float
    default_ms: float
    ratio: float  # live / default
    other_form_ratio: float  # the live session's other weight form (GEMM A <-> B) / default
    live_spin_ms: float | None = None  # with --spin: the same sessions with spinning threads
    default_spin_ms: float | None = None


def feeds(backend: OnnxBackend, past: int, prompt: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """The inputs of one decode step (batch 1, one token after ``past``) and of a prefill of ``prompt`` tokens."""
    d, gen = backend.decoder, np.random.default_rng(seed)
    vocab = backend._indexes.get(d["input_ids"], 2)  # the rows of the table the ids index

    def feed(seq: int, past_len: int) -> dict[str, np.ndarray]:
        mask = np.ones((1, past_len + seq), np.int64)
        f = {d["input_ids"]: gen.integers(1, vocab, (1, seq)).astype(np.int64), d["attention_mask"]: mask}
        if d.get("position_ids"):
            f[d["position_ids"]] = positions(mask, seq)
        if d.get("logits_to_keep"):
            f[d["logits_to_keep"]] = np.array([seq - 1], np.int64)
        for name in backend._past_names():
            _, heads, _, dim = backend._inputs[name]["shape"]
            dtype = np.dtype(backend._inputs[name]["dtype"])
            f[name] = gen.standard_normal((1, heads, past_len, dim)).astype(dtype)
        return f

    return {"decode_step": feed(1, past), f"prefill_{prompt}": feed(prompt, 0)}


def runner(sess, feed: dict[str, np.ndarray], outputs: list[str], bound: dict | None = None):
    """A no-argument call running ``feed`` on ``sess`` through one IOBinding (``bound``: OrtValues bound once)."""
    import onnxruntime as ort

    binding = sess.io_binding()
    for name, v in (bound or {}).items():
        binding.bind_ortvalue_input(name, v)
    values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in feed.items()}
    for name, v in values.items():
        binding.bind_ortvalue_input(name, v)

    def run() -> None:
        for name in outputs:
            binding.bind_output(name, "cpu")
        sess.run_with_iobinding(binding)

    run._keep = values  # the inputs must outlive the binding
    return run


def phases(
    live: OnnxBackend, default, past: int, prompt: int, repeats: int, other_form: bool = False
) -> dict[str, dict[str, Timing]]:
    """Per phase (``decode_step``, ``prefill_<prompt>``): the live session the backend picks for it against
    ``default`` (a prepacked session of the same graph), and with ``other_form`` the live session it does not
    pick, ``repeats`` interleaved rounds."""
    outs, timings = live.output_names, {}
    for phase, feed in feeds(live, past, prompt).items():
        chosen = live._session_for(feed)
        subjects = {"live": [runner(chosen, feed, outs, live._values)], "default": [runner(default, feed, outs)]}
        if other_form:
            other = live.session if chosen is live.one_row_session else live.one_row_session
            subjects["other"] = [runner(other, feed, outs, live._values)]
        progress(f"  {phase}: {repeats} interleaved rounds")
        timings[phase] = cycles(subjects, repeats)
    return timings


def measure(cfg: Config, dtype: str, workdir: Path) -> list[Row]:
    progress(f"[{dtype}] building a transformers Llama of {cfg.preset} shapes")
    model = hf_llama(cfg.preset, DTYPES[dtype])
    if dtype == "int8":
        from shira_runtime import quantize

        model = quantize(model, "int8")
    bundle = workdir / f"bundle-{dtype}"
    progress(f"[{dtype}] exporting with its KV cache (torch.export + dynamo ONNX exporter)")
    export_onnx(model, (torch.ones(1, 4, dtype=torch.long),), bundle, verify=False)
    del model
    gc.collect()
    progress(f"[{dtype}] opening the live bundle (checks and the live-weights probe)")
    live = OnnxBackend.open(bundle, threads=cfg.threads)
    progress(f"[{dtype}] opening the default prepacked session (shared initializers)")
    default_path = initializer_graph(bundle, "default.onnx", gemm_b=True)
    default = session(default_path, cfg.threads, shared=live.arrays)
    spinning = None
    if cfg.spin:
        progress(f"[{dtype}] opening both again with spinning threads")
        spun = OnnxBackend.open(bundle, threads=cfg.threads, spin=True)
        spinning = (spun, session(default_path, cfg.threads, shared=spun.arrays, spin=True))
    blocks: dict[str, list[dict[str, dict[str, Timing]]]] = {"sleep": [], "spin": []}
    for _ in range(BLOCKS if spinning else 1):  # sleeping and spinning pairs in alternate blocks
        blocks["sleep"].append(phases(live, default, cfg.past, cfg.prompt, cfg.repeats, other_form=True))
        if spinning:
            blocks["spin"].append(phases(*spinning, cfg.past, cfg.prompt, cfg.repeats))

    def ms(kind: str, phase: str, who: str) -> float | None:
        got = [b[phase][who].median_ms for b in blocks[kind]]
        return statistics.median(got) if got else None

    rows = []
    for phase in blocks["sleep"][0]:
        live_ms, default_ms, other_ms = (ms("sleep", phase, k) for k in ("live", "default", "other"))
        spin = [ms("spin", phase, k) for k in ("live", "default")]
        rows.append(Row(dtype, phase, live_ms, default_ms, live_ms / default_ms, other_ms / default_ms, *spin))
        progress(f"[{dtype}] {phase}: live {live_ms:.1f} ms, default {default_ms:.1f} ms, other form {other_ms:.1f}")
    del live, default, spinning
    gc.collect()
    return rows


def live_vs_prepacked(rows: list[Row], dtype: str = "fp32") -> dict[str, float]:
    """The ratios the README quotes: ``decode_step`` and ``prefill_<n>``, live / default, for ``dtype``."""
    return {r.phase: r.ratio for r in rows if r.dtype == dtype}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama-1b")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="default: fp32 fp16 (--quick: fp32)")
    p.add_argument("--past", type=int, default=128, help="KV cache length before the decode step")
    p.add_argument("--prompt", type=int, default=64, help="prefill length")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    p.add_argument("--quick", action="store_true", help="small preset, few repeats (fp32 unless --dtype)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--dir", type=Path, default=None, help="where to write the bundles (default: a temp dir)")
    p.add_argument("--spin", action="store_true", help="also time the sessions with spinning intra-op threads")
    args = p.parse_args(argv)
    preset = "small" if args.quick else args.preset
    dtypes = tuple(args.dtype) if args.dtype else ("fp32",) if args.quick else ("fp32", "fp16")
    repeats = args.repeats or (5 if args.quick else 15)
    cfg = Config(preset, dtypes, args.past, args.prompt, repeats, args.threads, args.spin)
    print(f"# decode: {cfg}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for dtype in dtypes:
            rows += measure(cfg, dtype, Path(tmp))
    spin_cols = ["live spinning ms", "default spinning ms"] if cfg.spin else []
    print_table(
        ["dtype", "phase", "live ms", "default ms", "live / default", "other live form / default", *spin_cols],
        [
            [r.dtype, r.phase, r.live_ms, r.default_ms, r.ratio, r.other_form_ratio]
            + ([r.live_spin_ms, r.default_spin_ms] if cfg.spin else [])
            for r in rows
        ],
    )
    if args.json:
        doc = {"config": asdict(cfg), "rows": [asdict(r) for r in rows], "live_vs_prepacked": live_vs_prepacked(rows)}
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
