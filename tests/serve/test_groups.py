"""A replica's scheduler without Ray: requests grouped by adapter, one switch per group, replies that name the
adapter read from the runtime; request payloads checked, and refused requests turned into HTTP replies and back."""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future

import pytest
import torch
from shira_runtime import Runtime, UnknownAdapterError
from shira_runtime.errors import AdapterValueError
from shira_runtime.models import TARGETS, build
from shira_runtime.serve import error_from_reply, error_reply, expected
from shira_runtime.serve_groups import (
    AdapterGroups,
    BadRequestError,
    GroupWorker,
    ServeError,
    adapter_name,
    check_adapter,
    end_tokens,
    new_tokens,
    parse_request,
    vocab_size,
)
from shira_runtime.synthetic import random_shira

PROMPT = (5, 9, 2, 7)


def keys(group) -> list:
    return [(j.adapter, j.ids) for j in group]


def test_oldest_group_first_and_one_group_per_adapter():
    g = AdapterGroups(max_batch=8)
    for i, a in enumerate(["a", "b", "a", "b", "a"]):
        g.put(a, (i,), 4)
    assert keys(g.take(active=None)) == [("a", (0,)), ("a", (2,)), ("a", (4,))]
    assert keys(g.take(active="a")) == [("b", (1,)), ("b", (3,))]
    assert g.pending == 0


def test_the_active_adapter_goes_first_even_when_younger():
    g = AdapterGroups()
    g.put("a", (1,), 4)
    g.put("b", (2,), 4)
    assert [j.adapter for j in g.take(active="b")] == ["b"]  # no switch
    assert [j.adapter for j in g.take(active="b")] == ["a"]


def test_the_active_adapter_yields_after_max_stay_groups():
    """A busy adapter cannot starve another: after ``max_stay`` groups in a row, the waiting one runs."""
    g = AdapterGroups(max_batch=1, max_stay=3)
    g.put("b", (0,), 4)
    for i in range(10):
        g.put("a", (i,), 4)
    taken = [g.take(active="a")[0].adapter for _ in range(4)]
    assert taken == ["a", "a", "a", "b"]
    # alone, an adapter stays as long as it has requests
    assert [g.take(active="b")[0].adapter for _ in range(7)] == ["a"] * 7


def test_max_batch_splits_a_group_and_lengths_never_mix():
    g = AdapterGroups(max_batch=2)
    for i in range(3):
        g.put("a", (i, i), 4)
    g.put("a", (9,), 4)  # another prompt length: another group
    g.put("a", (8, 8), 6)  # another max_new_tokens: another group
    sizes = []
    while g.pending:
        group = g.take(active="a")
        assert len({(len(j.ids), j.max_new_tokens) for j in group}) == 1
        sizes.append(len(group))
    assert sorted(sizes) == [1, 1, 1, 2]


def test_take_times_out_empty_and_close_fails_waiting_requests():
    g = AdapterGroups()
    assert g.take(active=None, timeout=0.01) == []
    fut = g.put("a", PROMPT, 4)
    g.close("replica stopping")
    with pytest.raises(ServeError, match="request not run: replica stopping"):
        fut.result(timeout=1)
    with pytest.raises(ServeError, match="the scheduler is closed: replica stopping"):
        g.put("a", PROMPT, 4)
    with pytest.raises(ServeError, match="the scheduler is closed"):
        g.take(active=None)


@pytest.mark.parametrize(
    ("ids", "new", "match"),
    [((), 4, "non-empty prompt"), ((1, 2), -1, "max_new_tokens must be a non-negative int"), ((1,), True, "int")],
)
def test_bad_requests_are_refused_at_put(ids, new, match):
    with pytest.raises(ValueError, match=match):
        AdapterGroups().put("a", ids, new)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        ([1, 2, 3], "a request is .*, got list"),
        ({"prompt": [1]}, r"a request is .*, got a dict with keys \['prompt'\]"),
        ({"ids": [1], "max_tokens": 3}, r"unknown keys \['max_tokens'\]"),
        ({"ids": "1 2 3"}, "'ids' must be a non-empty list of token ids"),
        ({"ids": []}, "'ids' must be a non-empty list"),
        ({"ids": [1, -2]}, r"ints >= 0\), got \[1, -2\]"),
        ({"ids": [1, True]}, "'ids' must be"),
        ({"ids": [1.5]}, "'ids' must be"),
        ({"ids": [1], "max_new_tokens": "8"}, "'max_new_tokens' must be a non-negative int, got '8'"),
        ({"ids": [1], "max_new_tokens": False}, "'max_new_tokens' must be"),
        ({"ids": [1], "adapter": 3}, "'adapter' must be a name"),
    ],
)
def test_bad_payloads_are_refused_naming_what_is_wrong(payload, match):
    with pytest.raises(BadRequestError, match=match):
        parse_request(payload)


def test_good_payloads_parse():
    assert parse_request({"ids": [3, 4]}) == (None, [3, 4], 16)
    assert parse_request({"ids": (3,), "max_new_tokens": 0, "adapter": "a"}) == ("a", [3], 0)


def test_token_ids_past_the_vocabulary_are_refused_before_they_fail_a_group(tiny, tmp_path):
    """An id past the vocabulary would fail the whole batch it is generated in; the replica refuses it alone."""
    rt, _, _ = tiny
    assert vocab_size(rt) == 256 and vocab_size(Runtime.load(torch.nn.Linear(2, 2))) is None
    assert parse_request({"ids": [0, 255]}, vocab=256) == (None, [0, 255], 16)
    with pytest.raises(BadRequestError, match=r"token id 256 is past the vocabulary \(256 tokens: ids 0..255\)"):
        parse_request({"ids": [3, 256]}, vocab=256)
    pytest.importorskip("onnxruntime")
    from shira_runtime.exporters import export_onnx

    bundle = export_onnx(build("tiny"), (torch.zeros(1, 8, dtype=torch.long),), tmp_path / "b")
    assert vocab_size(Runtime.load(bundle)) == 256  # the logits output's last dim


def test_refused_requests_become_http_replies_and_the_same_errors_again():
    """What the HTTP endpoint answers for each refusal, and what the HTTP client raises from that answer."""
    cases = [
        (UnknownAdapterError("no adapter named 'x'"), 404, "UnknownAdapterError"),
        (BadRequestError("'ids' must be a list"), 400, "BadRequestError"),
        (ServeError("the scheduler is closed"), 500, "ServeError"),
        (AdapterValueError("a.safetensors: NaN in 'w'"), 500, "AdapterValueError"),
    ]
    for exc, status, name in cases:
        got_status, body = error_reply(exc)
        assert (got_status, body) == (status, {"error": name, "message": str(exc)})
        again = error_from_reply(status, json.dumps(body).encode())
        assert type(again) is type(exc) and str(again) == str(exc) and again.status == status
    # a bug is reported as ServeError with its own class named; a reply without our body still raises ServeError
    assert error_reply(ZeroDivisionError("x")) == (500, {"error": "ServeError", "message": "ZeroDivisionError: x"})
    err = error_from_reply(502, b"Bad Gateway")
    assert type(err) is ServeError and str(err) == "HTTP 502: Bad Gateway" and err.status == 502
    err = error_from_reply(500, json.dumps({"error": "os.system", "message": "m"}).encode())  # not one of ours
    assert type(err) is ServeError and str(err) == "HTTP 500: m"


def test_adapter_name_of_active():
    assert adapter_name(()) is None
    assert adapter_name((("a", 1.0),)) == "a"
    assert adapter_name((("a", 0.5), ("b", 1.0))) == "a*0.5+b*1"


@pytest.fixture(scope="module")
def tiny():
    """A tiny decoder with three SHiRA adapters big enough to change its greedy outputs."""
    m = build("tiny", torch.float32, seed=0)
    rt = Runtime.load(m)
    for i in range(3):
        rt.add_adapter(f"s{i}", random_shira(m, TARGETS, 0.01, seed=i + 1, std=0.2))
    prompts = [
        tuple(int(t) for t in torch.randint(1, 256, (6,), generator=torch.Generator().manual_seed(k))) for k in range(4)
    ]
    want = {a: expected(rt, a, prompts, 5) for a in [None, "s0", "s1", "s2"]}
    assert len({str(w) for w in want.values()}) == 4  # every adapter answers differently: a wrong one would show
    return rt, prompts, want


def test_worker_answers_every_request_with_its_adapter_switching_once_per_group(tiny):
    rt, prompts, want = tiny
    g = AdapterGroups(max_batch=4, max_stay=2)
    order = [a for _ in range(3) for a in (None, "s0", "s1", "s2")]
    futures: list[tuple[str | None, int, Future]] = []
    # queue everything before the worker starts: groups are then as large as they can be
    for a in order:
        for k, p in enumerate(prompts):
            futures.append((a, k, g.put(a, p, 5)))
    assert rt.active == ()
    worker = GroupWorker(rt, g, "test").start()
    try:
        replies = [(a, k, f.result(timeout=60)) for a, k, f in futures]
    finally:
        worker.stop()
    for a, k, r in replies:
        assert r.adapter == a
        assert r.tokens == want[a][k]
        assert r.replica == "test"
    # 48 requests of 4 adapters, batches of 4: 12 groups, and a switch only when the adapter changes
    assert len({(r.switch_seq, r.batch, r.generate_ms) for _, _, r in replies}) == 12
    assert worker.switches == len({r.switch_seq for _, _, r in replies if r.switched})
    # each adapter's 3 groups run as 2 + 1 (max_stay 2): base, base, s0, s0, s1, s1, s2, s2, base, s0, s1, s2;
    # 7 switches (the base was active at the start), where one switch per request would make up to 48
    assert worker.switches == 7
    assert worker.served == 48
    assert adapter_name(rt.active) == "s2"  # the last group's


def test_worker_under_concurrent_submitters(tiny):
    """Threads submit while the worker runs: every reply still comes from its own adapter."""
    rt, prompts, want = tiny
    g = AdapterGroups(max_batch=3)
    worker = GroupWorker(rt, g).start()
    results, errors = [], []

    def client(seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        try:
            for _ in range(12):
                a = [None, "s0", "s1", "s2"][int(torch.randint(4, (1,), generator=gen))]
                k = int(torch.randint(len(prompts), (1,), generator=gen))
                results.append((a, k, g.put(a, prompts[k], 5).result(timeout=60)))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    worker.stop()
    assert errors == []
    assert len(results) == 48
    assert all(r.adapter == a and r.tokens == want[a][k] for a, k, r in results)


def test_a_failing_group_fails_only_its_requests(tiny):
    """An adapter that cannot be switched to fails its own group with the runtime's error; the others run."""
    rt, prompts, want = tiny
    g = AdapterGroups()
    bad = g.put("missing", prompts[0], 5)
    good = g.put("s1", prompts[1], 5)
    worker = GroupWorker(rt, g).start()
    try:
        with pytest.raises(UnknownAdapterError, match="no adapter named 'missing'"):
            bad.result(timeout=60)
        assert good.result(timeout=60).tokens == want["s1"][1]
    finally:
        worker.stop()
    assert worker.alive is False and worker.error is None


def test_cancelled_requests_are_skipped(tiny):
    rt, prompts, _ = tiny
    g = AdapterGroups()
    gone = g.put("s2", prompts[0], 5)
    assert gone.cancel()
    worker = GroupWorker(rt, g)
    worker.run_group(g.take(active=None))
    assert worker.served == 0 and worker.switches == 0


def test_check_adapter_names_the_registered_ones(tiny):
    rt, _, _ = tiny
    assert check_adapter(rt, None) is None and check_adapter(rt, "s0") == "s0"
    with pytest.raises(UnknownAdapterError, match=r"no adapter named 'x' on this replica; registered: \['s0'"):
        check_adapter(rt, "x")


def test_new_tokens_stop_at_the_first_end_token():
    assert new_tokens([7, 8, 1, 2, 3], 2, [2]) == [1, 2]
    assert new_tokens([7, 8, 1, 2, 2, 2], 2, [2]) == [1, 2]  # the batch's padding after the end is no answer
    assert new_tokens([7, 8, 1, 3, 4], 2, [2]) == [1, 3, 4]
    assert new_tokens([7, 8, 5, 1, 9], 2, [9, 5]) == [5]
    assert new_tokens([7, 8], 2, [2]) == []
    assert new_tokens([7, 8, 1, 2], 2, []) == [1, 2]


def test_a_reply_does_not_depend_on_the_requests_beside_it():
    """A row that ends early inside a group is padded until the group ends; its reply is cut after its end token,
    so it equals what the same request alone returns (the check against the driver failed on the real model: a
    batch of three padded the row, the replica's batch of one did not)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    m = transformers.LlamaForCausalLM(cfg).eval()
    rt = Runtime.load(m)
    prompts = [
        tuple(int(t) for t in torch.randint(1, 256, (6,), generator=torch.Generator().manual_seed(k))) for k in range(3)
    ]
    free = rt.generate(torch.tensor([list(p) for p in prompts]), max_new_tokens=6)[:, 6:]
    # an end token that one row reaches before its last new token and no other row produces
    others = lambda r: free[[i for i in range(len(prompts)) if i != r]].flatten().tolist()  # noqa: E731
    row, j = next(
        (r, j)
        for r in range(len(prompts))
        for j in range(5)
        if int(free[r, j]) not in free[r, :j].tolist() and int(free[r, j]) not in others(r)
    )
    end = int(free[row, j])
    m.generation_config.eos_token_id = end
    m.generation_config.pad_token_id = end
    assert end_tokens(rt) == [end]
    g = AdapterGroups(max_batch=4)
    futures = [g.put(None, p, 6) for p in prompts]
    worker = GroupWorker(rt, g, "t").start()
    try:
        replies = [f.result(timeout=60) for f in futures]
    finally:
        worker.stop()
    assert [r.batch for r in replies] == [3, 3, 3]  # one group: the row ended early inside it
    assert replies[row].tokens == free[row, : j + 1].tolist()  # cut after its end token, no padding
    for p, r in zip(prompts, replies):
        one = rt.generate(torch.tensor([list(p)]), max_new_tokens=6)
        assert r.tokens == one[0, len(p) :].tolist(), p  # what the same request alone returns
    assert expected(rt, None, prompts, 6) == [r.tokens for r in replies]  # the driver's check agrees
