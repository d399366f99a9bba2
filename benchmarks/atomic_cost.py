"""What atomic switches cost: the SHiRA switch as shipped (saved-value buffers holding the ungathered marker: in
every entry on the references, in each buffer's first entry with the all-or-nothing kernel core; slices of one
arena per dtype reused from the retired state) against the allocation it replaced (fresh unfilled
buffers, which a rollback could not read), interleaved switch by switch in one run.

    python -m benchmarks.atomic_cost                     # llama-1b shapes, fp32, 1% masks
    python -m benchmarks.atomic_cost --preset small --repeats 20
"""

from __future__ import annotations

import argparse

import torch
from shira_runtime import Runtime, kernels
from shira_runtime.kernels.dtypes import SHORT, by_short
from shira_runtime.models import PRESETS, TARGETS, build
from shira_runtime.switcher import Switcher
from shira_runtime.synthetic import random_shira
from shira_runtime.table import print_table

from benchmarks.common import progress
from benchmarks.timing import cycles


def _unguarded(self: Switcher, lists: dict, whole: bool = True) -> tuple[list[torch.Tensor], dict, dict]:
    # the allocation before atomic switches: no marker, no reuse
    layout = lists["layout"]
    saved = [torch.empty(n, dtype=getattr(torch, d)) for d, n in zip(layout.dtypes, layout.sizes)]
    return saved, {}, dict(zip(lists["names"], zip(lists["indices"], saved)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.atomic_cost", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llama-1b", choices=sorted(PRESETS))
    p.add_argument("--dtype", default="fp32", choices=sorted(SHORT))
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--repeats", type=int, default=40)
    args = p.parse_args(argv)
    progress(f"building {args.preset} in {args.dtype}; kernels: {kernels.backend()}")
    model = build(args.preset, by_short(args.dtype).torch, seed=0)
    rt = Runtime.load(model)
    for k, name in enumerate("abcd"):  # each subject switches between its own pair: every timed switch is A -> B
        rt.add_adapter(name, random_shira(model, TARGETS, args.density, seed=k + 1))
    shipped = Switcher._ungathered

    def switch(impl, name):
        def run() -> None:
            Switcher._ungathered = impl
            rt.switch(name)

        return run

    progress(f"{args.repeats} switches each, interleaved")
    try:
        t = cycles(
            {
                "atomic": [switch(shipped, "a"), switch(shipped, "b")],
                "unguarded": [switch(_unguarded, "c"), switch(_unguarded, "d")],
            },
            args.repeats,
        )
    finally:
        Switcher._ungathered = shipped
    print(f"\nSHiRA switch, {args.preset} {args.dtype}, density {args.density}, kernels {kernels.backend()}\n")
    print_table(
        ["buffers", "switch ms", "p90 ms", "x unguarded"],
        [
            [
                "marked, reused (shipped)",
                t["atomic"].median_ms,
                t["atomic"].p90_ms,
                t["atomic"].median_ms / t["unguarded"].median_ms,
            ],
            ["fresh, unfilled (before)", t["unguarded"].median_ms, t["unguarded"].p90_ms, 1.0],
        ],
    )


if __name__ == "__main__":
    main()
