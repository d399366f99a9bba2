"""benchmarks.fusion: the --quick run's rows, fused accuracy measured through rt.switch, disjoint masks, seeded data."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from safetensors.torch import load_file
from shira_runtime import Runtime

from benchmarks import fusion
from benchmarks.fusion_tasks import BASE_TASKS, HELD_OUT, LETTER0, SEP, TASK_TOKEN, Sampler, eval_set

pytest.importorskip("peft")
TOKEN_TASK = {v: k for k, v in TASK_TOKEN.items()}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``--quick`` run through ``main``, with ``Runtime.switch`` and ``Runtime.generate`` recorded."""
    tmp = tmp_path_factory.mktemp("fusion")
    switches, generations = [], []
    real_switch, real_generate = Runtime.switch, Runtime.generate

    def switch(self, names, weights=None):
        switches.append((names if names is None or isinstance(names, str) else list(names), weights))
        return real_switch(self, names, weights)

    def generate(self, input_ids, *args, **kwargs):
        generations.append((self.active, TOKEN_TASK[int(input_ids[0, 0])], input_ids.shape[0]))
        return real_generate(self, input_ids, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Runtime, "switch", switch)
        mp.setattr(Runtime, "generate", generate)
        fusion.main(["--quick", "--json", str(tmp / "f.json"), "--keep", str(tmp / "adapters")])
    doc = json.loads((tmp / "f.json").read_text())
    return doc, switches, generations, tmp / "adapters"


def test_quick_run_has_a_row_per_method_mask_overlap_and_task(quick):
    doc, *_ = quick
    cfg = fusion.QUICK
    rows = doc["rows"]
    expected = {("lora", None, None, t) for t in cfg.tasks}
    expected |= {("shira", m, ov, t) for m in cfg.masks for ov in (True, False) for t in cfg.tasks}
    assert {(r["method"], r["mask"], r["overlap"], r["task"]) for r in rows} == expected
    assert len(rows) == len(expected)
    for r in rows:
        for k in ("single_acc", "fused_acc", "single_tok_acc", "fused_tok_acc"):
            assert 0.0 <= r[k] <= 1.0, (r["method"], r["task"], k)
        assert r["drop"] == pytest.approx(r["single_acc"] - r["fused_acc"])
        assert r["train_s"] > 0 and r["peak_rss_mb"] > 0
    # matched budgets: every adapter trains r * (out + in) entries per target layer, LoRA and SHiRA alike
    base = fusion.base_model(cfg)
    per_layer = sum(cfg.rank * sum(m.weight.shape) for n, m in base.named_modules() if n.endswith(cfg.targets))
    assert {r["trainable_params"] for r in rows} == {per_layer}
    assert [s["method"] for s in doc["summary"]] == [
        "lora",
        *(f"shira-{m}-{v}" for m in cfg.masks for v in ("overlap", "disjoint")),
    ]
    assert doc["summary"][0]["paper_avg_drop_points"] == 11.08


def test_fused_accuracy_is_measured_on_the_runtime_with_every_adapter_switched_in(quick):
    doc, switches, generations, _ = quick
    tasks = fusion.QUICK.tasks
    for label in [s["method"] for s in doc["summary"]]:
        names = [f"{label}/s0/{t}" for t in tasks]  # adapters are named by method, seed and task
        assert (names, [1.0] * len(tasks)) in switches, f"{label}: no rt.switch of all its adapters with weights 1"
        fused = [(task, n) for active, task, n in generations if active == tuple((a, 1.0) for a in names)]
        assert sorted(t for t, _ in fused) == sorted(tasks), f"{label}: fused evaluation not on the fused runtime"
        assert all(n == fusion.QUICK.eval_n for _, n in fused)
        for t, name in zip(tasks, names):
            assert (((name, 1.0),), t, fusion.QUICK.eval_n) in generations, f"{name}: single accuracy not via rt"
    for r in doc["rows"]:
        label = "lora" if r["method"] == "lora" else f"shira-{r['mask']}-{'overlap' if r['overlap'] else 'disjoint'}"
        assert r["fused_active"] == [f"{label}/s0/{t}" for t in tasks]


def _indices(adapter_dir) -> dict[str, set[int]]:
    """PEFT SHiRA indices ([2, N] rows, columns) of each layer as a set of (row, col) pairs."""
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {k: set(map(tuple, v.T.tolist())) for k, v in tensors.items() if k.endswith("shira_indices")}


@pytest.mark.parametrize("mask", fusion.QUICK.masks)
def test_disjoint_adapters_share_no_index_and_overlapping_ones_do(quick, mask):
    *_, root = quick
    tasks = fusion.QUICK.tasks
    for variant in ("disjoint", "overlap"):
        per_task = [_indices(root / "s0" / f"shira-{mask}-{variant}" / t) for t in tasks]
        assert per_task[0] and all(p.keys() == per_task[0].keys() for p in per_task)
        shared = sum(len(a[k] & b[k]) for a, b in itertools.combinations(per_task, 2) for k in a)
        if variant == "disjoint":
            assert shared == 0
        else:
            assert shared > 0  # wm: the same top |w| for every adapter; rand: 12.5% dense masks meet by chance
    if mask == "wm":
        assert all(p == per_task[0] for p in per_task)


def test_task_data_is_seeded_held_out_and_correct():
    for task in HELD_OUT:
        a, b, c = eval_set(task, 30, seed=3), eval_set(task, 30, seed=3), eval_set(task, 30, seed=4)
        assert torch.equal(a.prompts, b.prompts) and torch.equal(a.answers, b.answers)
        assert not torch.equal(a.prompts, c.prompts)
        assert len({tuple(p.tolist()) for p in a.prompts}) == 30
        assert bool((a.prompts[:, 0] == TASK_TOKEN[task]).all()) and bool((a.prompts[:, -1] == SEP).all())
    ev = eval_set("sort", 5, 0)
    assert torch.equal(ev.answers, ev.prompts[:, 1:-1].sort(1).values)
    ev = eval_set("reverse", 5, 0)
    assert torch.equal(ev.answers, ev.prompts[:, 1:-1].flip(1))
    ev = eval_set("recall", 5, 0)
    for p, y in zip(ev.prompts[:, 1:-1].tolist(), ev.answers.tolist()):
        pairs = dict(zip(p[:-1:2], p[1:-1:2]))
        assert p[-1] >= LETTER0 and pairs[p[-1]] == y[0]
    ev = eval_set("reverse", 200, 0)
    s1, s2 = Sampler(["reverse", *BASE_TASKS], 0, exclude=[ev]), Sampler(["reverse", *BASE_TASKS], 0, exclude=[ev])
    held = {tuple(p[1:-1].tolist()) for p in ev.prompts}
    for _ in range(5):
        (i1, l1), (i2, l2) = s1.batch(64), s2.batch(64)
        assert torch.equal(i1, i2) and torch.equal(l1, l2)
        for row in i1[i1[:, 0] == TASK_TOKEN["reverse"]]:
            assert tuple(row[1:7].tolist()) not in held  # never trains on an evaluation input
    assert not torch.equal(Sampler(["reverse"], 1).batch(8)[0], Sampler(["reverse"], 0).batch(8)[0])
