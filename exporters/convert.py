"""Convert adapters between PEFT SHiRA directories and our compact file.

    python -m exporters.convert to-ours PEFT_DIR OUT.safetensors [--values fp16|bf16|fp32] [--base PRESET]
    python -m exporters.convert to-peft OURS.safetensors OUT_DIR

PEFT files do not record the base tensors' shapes, which our file needs (flat indices): ``--base`` names a
built-in preset, a transformers model directory or ``module.path:callable`` that returns an ``nn.Module``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from runtime.models import load_base
from runtime.sparse import SparseAdapter


def peft_to_ours(
    peft_dir: str | Path, out: str | Path, shapes: dict[str, tuple[int, ...]], values: str | None = "fp32"
) -> SparseAdapter:
    """Read a PEFT SHiRA directory, flatten with the base ``shapes``, write our file; returns the adapter."""
    adapter = SparseAdapter.from_peft(peft_dir)
    adapter.shapes = {n: tuple(shapes[n]) for n in adapter.indices if n in shapes}
    missing = sorted(set(adapter.indices) - set(adapter.shapes))
    if missing:
        raise SystemExit(f"{peft_dir}: the base has no tensors named {missing[:3]}")
    adapter.save(out, values=values)
    return adapter


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m exporters.convert", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-ours", help="PEFT SHiRA directory -> our compact file")
    a.add_argument("peft_dir")
    a.add_argument("out")
    a.add_argument("--base", required=True, help="preset name, transformers dir, or module.path:callable")
    a.add_argument("--values", default="fp32", choices=["fp32", "fp16", "bf16"])
    b = sub.add_parser("to-peft", help="our file -> PEFT SHiRA directory")
    b.add_argument("file")
    b.add_argument("out_dir")
    b.add_argument("--force", action="store_true", help="write even if PEFT could not load it (see docs)")
    args = p.parse_args(argv)
    if args.cmd == "to-ours":
        base = load_base(args.base)
        shapes = {k: tuple(v.shape) for k, v in base.state_dict().items()}
        ad = peft_to_ours(args.peft_dir, args.out, shapes, args.values)
        size = Path(args.out).stat().st_size
        print(f"wrote {args.out}: {ad.nnz} nonzeros, {size} bytes, {size / max(ad.nnz, 1):.2f} bytes/nonzero")
    else:
        out = SparseAdapter.load(args.file).to_peft(args.out_dir, strict=not args.force)
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
