"""Part B: a packaged bundle (two SHiRA adapters, one PEFT LoRA), mutated; each copy is loaded, run once on the
manifest's example input, and every adapter is switched to and away.

One test per mutation family; its assertion message lists the failures grouped by what went wrong.
"""

from __future__ import annotations

import shutil

import pytest

from tests.fuzz.bundle_cases import BUNDLE_FAMILIES
from tests.fuzz.conftest import MIN_BUNDLE_CASES
from tests.fuzz.harness import BundleWorld, Case, bundle_contract, family_rng, run_family


def bundle_cases(world: BundleWorld, family: str) -> list[Case]:
    muts = BUNDLE_FAMILIES[family](family_rng(family), world.root)
    return [
        Case(family, i, params, apply, target=target, expect_adapters=expect)
        for i, (params, target, apply, expect) in enumerate(muts)
    ]


def run_cases(world: BundleWorld, family: str, cases: list[Case], tmp_path):
    def run(case: Case):
        dst = tmp_path / f"{family}-{case.index:03d}"
        shutil.copytree(world.root, dst)
        case.apply(dst)
        out = bundle_contract(world, dst, case)
        if out.kind != "failed":  # failing bundles stay in tmp_path, named in the report
            shutil.rmtree(dst)
        return out

    return run_family(family, cases, run)


@pytest.mark.parametrize("family", list(BUNDLE_FAMILIES))
def test_mutated_bundle_is_refused_or_equal(bundle_world, family, tmp_path):
    tally = run_cases(bundle_world, family, bundle_cases(bundle_world, family), tmp_path)
    tally.check()


def test_unmutated_control_loads_equal(bundle_world, tmp_path):
    tally = run_cases(
        bundle_world, "bundle_control", [Case("bundle_control", 0, {"op": "copy"}, lambda p: None)], tmp_path
    )
    assert tally.equal == 1, tally.report()


def test_enough_bundle_cases(bundle_world):
    counts = {f: len(bundle_cases(bundle_world, f)) for f in BUNDLE_FAMILIES}
    print(f"bundle cases: {sum(counts.values())} {counts}")
    assert sum(counts.values()) >= MIN_BUNDLE_CASES, counts
