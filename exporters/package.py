"""Package a base model and its adapters into one self-contained bundle directory (mobile-style deployment).

    python -m shira_runtime.exporters.package --base llama-1b --adapter chat=peft_shira_dir/ --adapter
    code=code.safetensors \
        --out bundle/ [--values fp16] [--dtype fp32] [--quantize int8] [--overwrite] [--no-progress]

``--base``: a built-in preset (``tiny``, ``small``, ``llama-1b``), a transformers model directory (needs
``transformers``), or ``module.path:callable`` returning an ``nn.Module`` (then ``--example-shape`` gives the
int64 input shape of its single input).
Adapters: PEFT SHiRA directories and our files become compact files in ``adapters/`` (with checksums and a
fingerprint of this base); PEFT LoRA directories are kept as LoRA (refused on an int8 base: no LoRA slots there).
``Runtime.load(bundle)`` registers them all. All or nothing: the bundle is written into a hidden directory beside
``--out`` and renamed at the end; a failed run leaves nothing at ``--out`` (and an old bundle there, replaced only
with ``--overwrite``, untouched). Progress bars go to stderr when it is a terminal (``--progress`` forces them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from shira_runtime.adapters import LoraAdapter, SparseAdapter, load_adapter, save_adapter
from shira_runtime.bundle import ADAPTERS_DIR, MANIFEST_FILE
from shira_runtime.errors import ExportError, ShiraError
from shira_runtime.exporters.progress import Phases
from shira_runtime.kernels.dtypes import SHORT, by_short
from shira_runtime.manifest import Manifest
from shira_runtime.models import load_base
from shira_runtime.peft_format import is_peft_dir
from shira_runtime.quantization import FORMAT_NAMES, QuantLinear, quantize
from shira_runtime.table import print_table
from torch import nn
from tqdm import tqdm

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
    values: str | None = None,
    quiet: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Export ``base`` to an ONNX bundle in ``out_dir`` and pack ``adapters`` (name -> PEFT dir, our file or
    in-memory adapter) into ``out_dir/adapters``; prints a size report unless ``quiet``. Returns ``out_dir``.

    ``values``: the dtype of the stored SHiRA deltas; None is fp16 on a float base (2 bytes per value) and fp32 on
    an int8 base, where a delta rounded to fp16 can move a weight to the next code of the grid: fp32 values give
    the bundle the torch backend's codes, hence its tokens.

    All or nothing: every adapter is read and checked against the base first, then the bundle is written into a
    hidden directory beside ``out_dir`` and renamed to ``out_dir`` at the end; a failure removes it and leaves
    nothing at ``out_dir``. An existing ``out_dir`` that is not empty is refused before any work unless
    ``overwrite``; then it must hold a bundle (a ``manifest.json``), and it is replaced only once the new bundle
    is complete (a failed run leaves it as it was). ``progress``: bars on stderr (None: when it is a terminal).
    """
    from shira_runtime.exporters.onnx_export import export_onnx

    out_dir = Path(out_dir)
    _check_out(out_dir, overwrite)
    if isinstance(base, str):
        base = load_base(base)
    if example_args is None:
        example_args = default_example_args(base)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    phases = Phases(f"package {out_dir.name}", ["check adapters", "export", "adapters", "publish"], progress)
    with phases:
        phases.step("check adapters")
        read = _read_adapters(base, adapters)
        quantized = any(isinstance(m, QuantLinear) for m in base.modules())
        if values is None:
            values = "fp32" if quantized else "fp16"
        if quantized:
            say(
                "an int8 base: the bundle keeps 1 byte per weight (the transposed uint8 copy the graph reads, "
                "mapped from the file) and switches it live, as fast as the torch backend switches its codes; on "
                "the CPU we measured it infers at the fp32 bundle's speed (docs/quantized.md, "
                "benchmarks.switch_latency)"
            )
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".partial"))
        try:
            phases.step("export")
            t0 = time.perf_counter()
            say(f"exporting the base to {out_dir} ...")
            export_onnx(base, example_args, stage, progress=phases.enabled)
            say(f"  exported in {time.perf_counter() - t0:.1f} s")
            phases.step("adapters")
            packed = _write_adapters(stage, read, adapters, values, phases.enabled)
            manifest = Manifest.read(stage)
            manifest.adapters = {
                p.name: {"kind": p.kind, "path": p.path, "nonzeros": p.nonzeros, "bytes": p.bytes} for p in packed
            }
            manifest.write(stage)
            phases.step("publish")
            _publish(stage, out_dir, overwrite)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        phases.close()
    if not quiet:
        sd = base.state_dict()
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


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that a successful run could not take, before any work."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty; pick a new directory or pass overwrite (--overwrite)")
    if not (out / MANIFEST_FILE).is_file():
        raise FileExistsError(f"{out}: exists and holds no bundle ({MANIFEST_FILE}); refusing to replace it")


def _publish(stage: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished bundle ``stage`` to ``out``; an old bundle there is moved aside first, put back if the
    rename fails, and deleted once the new one is in place."""
    _check_out(out, overwrite)  # again: it may have appeared while we worked
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.rename(stage, out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
    os.rename(out, old / "bundle")
    try:
        os.rename(stage, out)
    except BaseException:
        os.rename(old / "bundle", out)
        raise
    finally:
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)


def _read_adapters(base: nn.Module, adapters: dict[str, object]) -> dict[str, SparseAdapter | LoraAdapter]:
    """Every adapter read and checked against ``base``, with the base shapes and a fingerprint recorded.

    On a quantized base they are checked as the runtime checks them (the fingerprint of an adapter made on the
    float model compares with the dequantized codes, within half a grid step); an adapter without a fingerprint
    (PEFT) gets one of the dequantized weights, which the bundle's codes decode to exactly.
    """
    formats = {m.format for m in base.modules() if isinstance(m, QuantLinear)}
    if formats - {"int8"}:
        raise ExportError(
            f"the base holds {'/'.join(sorted(formats - {'int8'}))} layers: bundles hold int8 bases only "
            "(onnxruntime's CPU provider has no FP8 matmul); serve an FP8 base on the torch backend "
            "(Runtime.load(module)) and ship its adapters as files of codes for it "
            "(save_adapter(shira_runtime.quantization.bake(adapter, module), path)); nothing was written"
        )
    from shira_runtime import Runtime

    checker = Runtime.load(base) if formats else None
    weights = _dequantized(base) if formats else base.state_dict()
    read = {}
    for name, source in adapters.items():
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"adapter name {name!r} cannot be a file name")
        ad = load_adapter(source)
        if isinstance(ad, LoraAdapter):
            if not (isinstance(source, (str, Path)) and is_peft_dir(source)):
                raise ValueError(f"adapter {name!r}: LoRA adapters are packaged from PEFT directories")
            _check_lora(base, name, ad)
            read[name] = ad
            continue
        if not isinstance(ad, SparseAdapter):
            raise ValueError(f"adapter {name!r}: a {type(ad).__name__} cannot be packaged (SHiRA or LoRA only)")
        if checker is None:
            read[name] = ad.for_base(weights, name)
            continue
        checker.add_adapter(name, ad)  # the runtime's own check on the quantized base
        recorded = ad.fingerprint
        ad = replace(ad, fingerprint=None).for_base(weights, name)
        if recorded is not None:  # made on the float model: keep its probes, checked with the grid's slack
            ad.fingerprint = recorded
        read[name] = ad
    return read


def _dequantized(base: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each quantized weight's codes replaced by the fp32 values they decode to."""
    sd = dict(base.state_dict())
    for path, m in base.named_modules():
        if isinstance(m, QuantLinear):
            sd[f"{path}.weight" if path else "weight"] = m.dequantize_weight()
    return sd


def _check_lora(base: nn.Module, name: str, ad: LoraAdapter) -> None:
    """A LoRA on a quantized weight could only run unfused, and bundles of int8 bases carry no LoRA slots."""
    quantized = {f"{p}.weight" if p else "weight" for p, m in base.named_modules() if isinstance(m, QuantLinear)}
    hit = sorted(set(ad.A) & quantized)
    if hit:
        raise ExportError(
            f"adapter {name!r}: a LoRA on int8 weights ({hit[:3]}{' ...' if len(hit) > 3 else ''}) cannot be "
            "bundled: merging it would change every code and its scales (no switch on the grid, no exact revert), "
            "and an int8 bundle has no unfused LoRA slots; package it with a float base, serve the int8 base on "
            "the torch backend (Runtime.load(module); add_adapter(name, dir, mode='unfused')), or train a SHiRA "
            "adapter; nothing was written"
        )


def _write_adapters(
    out: Path, read: dict, sources: dict[str, object], values: str, progress: bool | None
) -> list[PackedAdapter]:
    (out / ADAPTERS_DIR).mkdir(exist_ok=True)
    packed = []
    for name, ad in tqdm(read.items(), desc="adapters", file=sys.stderr, disable=_disable(progress), leave=False):
        if isinstance(ad, SparseAdapter):
            rel = f"{ADAPTERS_DIR}/{name}.safetensors"
            save_adapter(ad, out / rel, values=values)
            t0 = time.perf_counter()
            SparseAdapter.load(out / rel)  # read back as a runtime would: checksums verified, indices decoded
            decode_ms = (time.perf_counter() - t0) * 1e3
            size = (out / rel).stat().st_size
            packed.append(PackedAdapter(name, "shira", rel, ad.nnz, size, PEFT_BYTES_PER_NNZ * ad.nnz, decode_ms))
        else:
            rel = f"{ADAPTERS_DIR}/{name}"
            shutil.copytree(sources[name], out / rel)
            size = sum(f.stat().st_size for f in (out / rel).iterdir() if f.suffix == ".safetensors")
            packed.append(PackedAdapter(name, "lora", rel, ad.params, size, size))
    return packed


def _disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shira_runtime.exporters.package", description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="preset, transformers model dir, or module.path:callable")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a PEFT SHiRA/LoRA directory or our file; repeat for more (default: none, a bundle of the base alone)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="the bundle directory: written beside it, renamed at the end; must not exist or be empty",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a bundle at --out, once the new one is complete (default: refuse a non-empty --out)",
    )
    p.add_argument(
        "--values",
        default=None,
        choices=sorted(SHORT),
        help="dtype of the stored SHiRA deltas (default: fp16 on a float base; fp32 with --quantize int8, so the "
        "bundle's codes and tokens equal the torch backend's)",
    )
    p.add_argument(
        "--dtype", default="fp32", choices=sorted(SHORT), help="dtype of the base weights (default: %(default)s)"
    )
    p.add_argument(
        "--quantize",
        default=None,
        choices=FORMAT_NAMES,
        help="quantize the base first (every linear but the LM head); bundles hold int8 only; LoRA adapters on "
        "int8 weights are refused (default: no quantization)",
    )
    p.add_argument(
        "--example-shape",
        default=None,
        help="int64 input shape for the export, e.g. 1,8 (default: 1,8 random token ids, for a base with a vocabulary)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bars on stderr (default: when stderr is a terminal)",
    )
    args = p.parse_args(argv)
    adapters = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep:
            p.error(f"--adapter {item!r}: expected NAME=PATH")
        adapters[name] = path
    try:
        _run(args, adapters)
    except (ShiraError, OSError) as exc:  # the project's errors and file errors: a message, no trace
        p.exit(1, f"{p.prog}: error: {type(exc).__name__}: {exc}\n")


def _run(args: argparse.Namespace, adapters: dict[str, str]) -> None:
    _check_out(Path(args.out), args.overwrite)  # before the base is loaded (minutes for a large one)
    base = load_base(args.base, by_short(args.dtype).torch)
    if args.quantize:
        quantize(base, args.quantize)
    example = None
    if args.example_shape:
        shape = tuple(int(x) for x in args.example_shape.split(","))
        example = (torch.zeros(shape, dtype=torch.long),)
    package(base, args.out, adapters, example, values=args.values, overwrite=args.overwrite, progress=args.progress)


if __name__ == "__main__":
    main()
