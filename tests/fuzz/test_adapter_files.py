"""Part A: our adapter file and a PEFT LoRA directory, mutated; each is added, switched to, and switched away.

One test per mutation family; its assertion message lists the failures grouped by what went wrong, each
with the mutation's parameters. ``SHIRA_FUZZ_SEED`` changes the draw; ``pytest -s`` prints the counts.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests.fuzz.adapter_cases import FILE_FAMILIES
from tests.fuzz.conftest import LORA, MIN_ADAPTER_CASES, AdapterSources
from tests.fuzz.harness import Case, adapter_contract, family_rng, on_bytes, run_family
from tests.fuzz.lora_cases import CONFIG, WEIGHTS, lora_dir_edits
from tests.fuzz.mutations import parse, serialize

LORA_FAMILY = "lora_dir"
FAMILIES = [*FILE_FAMILIES, LORA_FAMILY]


def adapter_cases(sources: AdapterSources, family: str) -> list[Case]:
    if family == LORA_FAMILY:
        d = sources.paths[LORA]
        edits = lora_dir_edits(json.loads((d / CONFIG).read_text()), (d / WEIGHTS).read_bytes())
        return [Case(family, i, p, on_bytes(fn, rel), LORA, rel) for i, (p, rel, fn) in enumerate(edits)]
    muts = FILE_FAMILIES[family](family_rng(family), sources.files())
    return [Case(family, i, p, on_bytes(fn), original) for i, (original, p, fn) in enumerate(muts)]


def run_cases(sources: AdapterSources, family: str, cases: list[Case], tmp_path):
    def run(case: Case):
        src = sources.paths[case.original]
        dst = tmp_path / f"{family}-{case.index:03d}{src.suffix}"
        shutil.copytree(src, dst) if src.is_dir() else shutil.copyfile(src, dst)
        case.apply(dst)
        out = adapter_contract(sources.world, dst, case.original)
        if out.kind != "failed":  # failing inputs stay in tmp_path, named in the report
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        return out

    return run_family(family, cases, run)


@pytest.mark.parametrize("family", FAMILIES)
def test_mutated_adapter_is_refused_or_equal(adapter_sources, family, tmp_path):
    tally = run_cases(adapter_sources, family, adapter_cases(adapter_sources, family), tmp_path)
    tally.check()


def test_unmutated_controls_load_equal(adapter_sources, tmp_path):
    """The harness itself: a file re-serialized by our layout code, and an untouched copy, load equal."""
    cases = [
        Case("adapter_control", i, {"op": "re-serialize"}, on_bytes(lambda raw: serialize(*parse(raw))), name)
        for i, name in enumerate(adapter_sources.files())
    ]
    cases.append(Case("adapter_control", len(cases), {"op": "copy"}, lambda p: None, LORA))
    tally = run_cases(adapter_sources, "adapter_control", cases, tmp_path)
    assert tally.equal == len(cases), tally.report()


def test_enough_adapter_cases(adapter_sources):
    counts = {f: len(adapter_cases(adapter_sources, f)) for f in FAMILIES}
    print(f"adapter cases: {sum(counts.values())} {counts}")
    assert sum(counts.values()) >= MIN_ADAPTER_CASES, counts
