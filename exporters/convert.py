"""Convert adapters between PEFT SHiRA directories and our compact file.

    python -m shira_runtime.exporters.convert to-ours PEFT_DIR OUT.safetensors [--values fp16|bf16|fp32] [--base PRESET]
    python -m shira_runtime.exporters.convert to-peft OURS.safetensors OUT_DIR

PEFT files do not record the base tensors' shapes, which our file needs (flat indices): ``--base`` names a
built-in preset, a transformers model directory or ``module.path:callable`` that returns an ``nn.Module``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shira_runtime.adapters import SparseAdapter
from shira_runtime.errors import ShiraError
from shira_runtime.models import load_base
from torch import nn


def peft_to_ours(peft_dir: str | Path, out: str | Path, base: nn.Module, values: str | None = "fp32") -> SparseAdapter:
    """Read a PEFT SHiRA directory, check it against ``base`` (shapes, PEFT's ``r``) and write our file with
    the base's shapes and fingerprint; returns the adapter written."""
    adapter = SparseAdapter.from_peft(peft_dir).for_base(base.state_dict(), str(peft_dir))
    adapter.save(out, values=values)
    return adapter


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shira_runtime.exporters.convert", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-ours", help="PEFT SHiRA directory -> our compact file")
    a.add_argument("peft_dir")
    a.add_argument("out")
    a.add_argument("--base", required=True, help="preset name, transformers dir, or module.path:callable")
    a.add_argument(
        "--values",
        default="fp32",
        choices=["fp32", "fp16", "bf16"],
        help="dtype of the stored deltas (default: %(default)s)",
    )
    b = sub.add_parser("to-peft", help="our file -> PEFT SHiRA directory")
    b.add_argument("file")
    b.add_argument("out_dir")
    b.add_argument(
        "--force", action="store_true", help="write even if PEFT could not load it (see docs; default: refuse)"
    )
    args = p.parse_args(argv)
    try:
        _run(args)
    except (ShiraError, OSError) as exc:  # the project's errors and file errors: a message, no traceback
        p.exit(1, f"{p.prog}: error: {type(exc).__name__}: {exc}\n")


def _run(args: argparse.Namespace) -> None:
    if args.cmd == "to-ours":
        ad = peft_to_ours(args.peft_dir, args.out, load_base(args.base), args.values)
        size = Path(args.out).stat().st_size
        print(f"wrote {args.out}: {ad.nnz} nonzeros, {size} bytes, {size / max(ad.nnz, 1):.2f} bytes/nonzero")
    else:
        out = SparseAdapter.load(args.file).to_peft(args.out_dir, strict=not args.force)
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
