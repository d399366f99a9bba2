"""benchmarks.real_tasks over the real model's tokenizer, and benchmarks.fusion --hf on the real model (quick)."""

from __future__ import annotations

import json

import pytest

from benchmarks import fusion
from benchmarks.real_tasks import LETTERS, TASKS, Tasks

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


def _rule(task: str, prompt: str) -> str:
    """The answer ``task`` asks for, from the prompt's text (independent of the makers' code)."""
    body = prompt.split(" ", 1)[1]
    if task == "reverse":
        return " " + body.rstrip(":")[::-1]
    if task == "caesar":
        return " " + " ".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in body.rstrip(":").split())
    y, m, d = body.split(" ")[0].split("-")
    return f" {d}/{m}"


@pytest.mark.slow
@pytest.mark.parametrize("task", TASKS)
def test_eval_sets_are_seeded_distinct_correct_and_held_out(tokenizer, task):
    t = Tasks(tokenizer, seed=3)
    ev = t.eval_set(task, 40)
    again = Tasks(tokenizer, seed=3).eval_set(task, 40)
    other = Tasks(tokenizer, seed=4).eval_set(task, 40)
    assert ev.prompts.equal(again.prompts) and ev.answers.equal(again.answers)
    assert not ev.prompts.equal(other.prompts)
    assert len({tuple(p.tolist()) for p in ev.prompts}) == 40
    for p, a in zip(ev.prompts, ev.answers):
        prompt = tokenizer.decode(p)
        assert tokenizer.decode(a) == _rule(task, prompt), prompt
    held = {tuple(p.tolist()) for p in ev.prompts}
    ids, labels = t.sampler([task], seed=0).batch(300)
    n = ev.prompts.shape[1]
    for row, lab in zip(ids, labels):
        assert tuple(row[:n].tolist()) not in held  # never trains on an evaluation input
        answer = [int(x) for x in lab if x != -100]
        assert answer[-1] == t.eos and (lab[:n] == -100).all()  # the loss sees the answer and the end token
        prompt = tokenizer.decode(row[:n])
        assert tokenizer.decode(answer[:-1]) == _rule(task, prompt)


@pytest.mark.slow
def test_fusion_quick_on_the_real_model(tmp_path):
    fusion.main(["--hf", "smollm2", "--quick", "--json", str(tmp_path / "f.json"), "--keep", str(tmp_path / "a")])
    doc = json.loads((tmp_path / "f.json").read_text())
    cfg = fusion.REAL_QUICK
    expected = {("lora", None, None, t) for t in cfg.tasks}
    expected |= {("shira", m, ov, t) for m in cfg.masks for ov in (True, False) for t in cfg.tasks}
    assert {(r["method"], r["mask"], r["overlap"], r["task"]) for r in doc["rows"]} == expected
    assert "LlamaForCausalLM" in doc["base"]["model"]
    assert set(doc["base"]["acc_held_out"]) == set(cfg.tasks)
    # the paper's density: r 4 trains 1-2% of the adapted weights, LoRA and SHiRA alike
    assert 0.01 < doc["rows"][0]["trainable_params"] / doc["adapted_weights"] < 0.02
    assert {r["trainable_params"] for r in doc["rows"]} == {doc["rows"][0]["trainable_params"]}
    for s in doc["summary"]:
        assert s["seeds"] == 1 and s["drop_sd_points"] == 0.0
    assert (tmp_path / "a" / "s0" / "lora" / "reverse" / "adapter_config.json").is_file()
