"""Package a base model and its adapters into one self-contained bundle directory (mobile-style deployment).

    python -m shira_runtime.exporters.package --base llama-1b --adapter chat=peft_shira_dir/ --adapter
    code=code.safetensors \
        --out bundle/ [--values fp16] [--dtype fp32] [--quantize int8]

``--base``: a built-in preset (``tiny``, ``small``, ``llama-1b``), a transformers model directory (needs
``transformers``), or ``module.path:callable`` returning an ``nn.Module`` (then ``--example-shape`` gives the
int64 input shape of its single input).
Adapters: PEFT SHiRA directories and our files become compact files in ``adapters/`` (with checksums and a
fingerprint of this base); PEFT LoRA directories are kept as LoRA. ``Runtime.load(bundle)`` registers them all.
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from shira_runtime.adapters import LoraAdapter, SparseAdapter, load_adapter, save_adapter
from shira_runtime.bundle import ADAPTERS_DIR
from shira_runtime.kernels.dtypes import SHORT, by_short
from shira_runtime.manifest import Manifest
from shira_runtime.models import load_base
from shira_runtime.peft_format import is_peft_dir
from shira_runtime.quantization import FORMAT_NAMES, QuantLinear, quantize
from shira_runtime.table import print_table
from torch import nn

PEFT_BYTES_PER_NNZ = 12  # PEFT SHiRA: fp32 value + int32 row + int32 col


def default_example_args(base: nn.Module) -> tuple[torch.Tensor, ...]:
    vocab = getattr(getattr(base, "config", None), "vocab", None) or getattr(
        getattr(base, "config", None), "vocab_size", None
    )
    if vocab is None:
        raise ValueError("example_args is required for a module that is not a built-in or transformers decoder")
    return (torch.randint(0, int(vocab), (1, 8)),)


@dataclass
class PackedAdapter:
    name: str
    kind: str
    path: str
    nonzeros: int
    bytes: int
    peft_bytes: int
    decode_ms: float | None = None

    def row(self, total: dict[str, int]) -> list[object]:
        per = self.bytes / self.nonzeros if self.nonzeros else None
        return [
            self.name,
            self.kind,
            self.nonzeros,
            self.nonzeros / total[self.name] if total[self.name] else None,
            self.bytes,
            per,
            self.peft_bytes,
            self.peft_bytes / self.bytes if self.bytes else None,
            self.decode_ms,
        ]


def package(
    base: nn.Module | str,
    out_dir: str | Path,
    adapters: dict[str, object],
    example_args: tuple | None = None,
    values: str = "fp16",
    quiet: bool = False,
) -> Path:
    """Export ``base`` to an ONNX bundle in ``out_dir`` and pack ``adapters`` (name -> PEFT dir, our file or
    in-memory adapter) into ``out_dir/adapters``; prints a size report unless ``quiet``. Returns ``out_dir``."""
    from shira_runtime.exporters.onnx_export import export_onnx

    if isinstance(base, str):
        base = load_base(base)
    if example_args is None:
        example_args = default_example_args(base)
    out_dir = Path(out_dir)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    # read and check every adapter before writing anything; on a quantized base, as the runtime checks them (the
    # fingerprint of an adapter made on the float model compares with the dequantized codes)
    formats = {m.format for m in base.modules() if isinstance(m, QuantLinear)}
    quantized = bool(formats)
    if formats - {"int8"}:
        from shira_runtime.exporters.onnx_export import ExportError

        raise ExportError(
            f"the base holds {'/'.join(sorted(formats - {'int8'}))} layers: bundles hold int8 bases only "
            "(onnxruntime's CPU provider has no FP8 matmul); serve an FP8 base on the torch backend "
            "(Runtime.load(module)) and ship its adapters as files of codes for it "
            "(save_adapter(shira_runtime.quantization.bake(adapter, module), path)); nothing was written"
        )
    from shira_runtime import Runtime

    checker = Runtime.load(base) if quantized else None
    read = {}
    for name, source in adapters.items():
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"adapter name {name!r} cannot be a file name")
        ad = load_adapter(source)
        if isinstance(ad, SparseAdapter) and checker is not None:
            checker.add_adapter(name, ad)
            read[name] = ad
        else:
            read[name] = ad.for_base(base.state_dict(), name) if isinstance(ad, SparseAdapter) else ad
    del checker
    if quantized:
        say(
            "an int8 base: the bundle keeps 2 bytes per weight (the codes and the graph's transposed uint8 copy) "
            "and switches live; on the CPU we measured it infers at the fp32 bundle's speed but switches several "
            "times slower than the torch backend, which writes the codes alone (README, benchmarks.switch_latency)"
        )
    t0 = time.perf_counter()
    say(f"exporting the base to {out_dir} ...")
    export_onnx(base, example_args, out_dir)
    say(f"  exported in {time.perf_counter() - t0:.1f} s")
    (out_dir / ADAPTERS_DIR).mkdir(exist_ok=True)
    sd = base.state_dict()
    packed = []
    for name, ad in read.items():
        if isinstance(ad, SparseAdapter):
            rel = f"{ADAPTERS_DIR}/{name}.safetensors"
            save_adapter(ad, out_dir / rel, values=values)
            t0 = time.perf_counter()
            SparseAdapter.load(out_dir / rel)  # read back as a runtime would: checksums verified, indices decoded
            decode_ms = (time.perf_counter() - t0) * 1e3
            size = (out_dir / rel).stat().st_size
            packed.append(PackedAdapter(name, "shira", rel, ad.nnz, size, PEFT_BYTES_PER_NNZ * ad.nnz, decode_ms))
        else:
            rel = f"{ADAPTERS_DIR}/{name}"
            src = adapters[name]
            if not (isinstance(src, (str, Path)) and is_peft_dir(src)):
                raise ValueError(f"adapter {name!r}: LoRA adapters are packaged from PEFT directories")
            shutil.copytree(src, out_dir / rel, dirs_exist_ok=True)
            size = sum(f.stat().st_size for f in (out_dir / rel).iterdir() if f.suffix == ".safetensors")
            assert isinstance(ad, LoraAdapter)
            packed.append(PackedAdapter(name, "lora", rel, ad.params, size, size))
    manifest = Manifest.read(out_dir)
    manifest.adapters = {
        p.name: {"kind": p.kind, "path": p.path, "nonzeros": p.nonzeros, "bytes": p.bytes} for p in packed
    }
    manifest.write(out_dir)
    if not quiet:
        total = {
            n: sum(sd[t].numel() for t in (ad.indices if isinstance(ad, SparseAdapter) else ad.A))
            for n, ad in read.items()
        }
        print()
        print_table(
            [
                "adapter",
                "kind",
                "nonzeros",
                "density",
                "bytes",
                "bytes/nonzero",
                "PEFT bytes",
                "x smaller",
                "decode ms",
            ],
            [p.row(total) for p in packed],
        )
    return out_dir


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shira_runtime.exporters.package", description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="preset, transformers model dir, or module.path:callable")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a PEFT SHiRA/LoRA directory or our file; repeat for more",
    )
    p.add_argument("--out", required=True)
    p.add_argument("--values", default="fp16", choices=sorted(SHORT), help="dtype of stored deltas")
    p.add_argument("--dtype", default="fp32", choices=sorted(SHORT), help="dtype of the base weights")
    p.add_argument(
        "--quantize",
        default=None,
        choices=FORMAT_NAMES,
        help="quantize the base first (every linear but the LM head); bundles hold int8 only",
    )
    p.add_argument("--example-shape", default=None, help="int64 input shape for the export, e.g. 1,8")
    args = p.parse_args(argv)
    adapters = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--adapter {item!r}: expected NAME=PATH")
        adapters[name] = path
    base = load_base(args.base, by_short(args.dtype).torch)
    if args.quantize:
        quantize(base, args.quantize)
    example = None
    if args.example_shape:
        shape = tuple(int(x) for x in args.example_shape.split(","))
        example = (torch.zeros(shape, dtype=torch.long),)
    package(base, args.out, adapters, example, values=args.values)


if __name__ == "__main__":
    main()
