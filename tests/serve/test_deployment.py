"""The runtime on a local Ray Serve: 2 replicas over the tiny preset with 3 SHiRA adapters, every reply checked
against the driver's own runtime; refused requests answered with the project's error (its class, message and HTTP
status); the command-line server checked over HTTP; a killed replica replaced; a quiet stop.

Skipped (with the reason) only where Ray is not installed or cannot start; CI installs it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install -e '.[serve]')")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[serve]')")

from shira_runtime import UnknownAdapterError  # noqa: E402
from shira_runtime.serve import (  # noqa: E402
    Client,
    HttpClient,
    RuntimeSpec,
    ServeConfig,
    Synthetic,
    expected,
    run,
    start_local,
    stop,
)
from shira_runtime.serve_groups import BadRequestError, ServeError  # noqa: E402

SPEC = RuntimeSpec("tiny", synthetic=Synthetic(3, std=0.2))
HTTP: dict[str, str] = {}  # the served deployment's URL
NEW = 5
PROMPTS = [[1 + (13 * i + 7 * j) % 250 for j in range(6)] for i in range(4)]


def test_command_line_server_serves_a_bundle_over_http(tmp_path):
    """``python -m shira_runtime.serve BUNDLE --check``: a packaged bundle and its adapters served on its own cluster,
    HTTP on loopback, every adapter and the base answered right (checked against the driver's runtime over the
    same bundle), everything shut down. Runs first, before this module's cluster starts."""
    from shira_runtime.exporters.package import package
    from shira_runtime.models import TARGETS, build
    from shira_runtime.synthetic import random_shira

    m = build("tiny")
    adapters = {f"s{i}": random_shira(m, TARGETS, 0.01, seed=i + 1, std=0.2) for i in range(3)}
    bundle = package(m, tmp_path / "bundle", adapters, quiet=True)
    cmd = [sys.executable, "-m", "shira_runtime.serve", str(bundle), "--num-cpus", "2", "--port", "8765", "--check"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode == 3:
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "serving 3 adapters ['s0', 's1', 's2'] on 2 replicas at http://127.0.0.1:8765/" in proc.stdout
    assert "all replies right" in proc.stdout
    for name in ("(base)", "s0", "s1", "s2"):
        assert proc.stdout.count(f"{name}: ok") == 3
    for alarming in ("graceful_shutdown", "Traceback", "failed"):  # main() stops the cluster quietly
        assert alarming not in proc.stdout + proc.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    """The deployment, reached by handles and over HTTP on loopback (``HTTP``)."""
    port = free_port()
    try:
        start_local(num_cpus=2, http_port=port)
    except Exception as exc:  # no cluster can start on this machine: say why
        stop()
        pytest.skip(f"Ray cannot start here: {exc!r}")
    try:
        handle = run(SPEC, ServeConfig(replicas=2, max_batch=4, replica_cpus=0.5, name="test-shira"), http=True)
        HTTP["url"] = f"http://127.0.0.1:{port}/"
        threads = torch.get_num_threads()
        try:  # the offline answers, from the same seeds, with one thread like a replica
            rt = SPEC.build()
            want = {a: expected(rt, a, PROMPTS, NEW) for a in [None, *rt.adapters]}
        finally:
            torch.set_num_threads(threads)  # build() set this process's threads
        assert len({str(w) for w in want.values()}) == 4  # every adapter answers differently
        yield handle, want
    finally:
        stop()


@pytest.mark.parametrize("affinity", [True, False], ids=["affinity", "adapter_blind"])
def test_every_reply_comes_from_its_adapter(served, affinity):
    handle, want = served
    client = Client(handle, affinity=affinity)
    sent = [(a, k, client.submit(a, p, NEW)) for _ in range(2) for a in want for k, p in enumerate(PROMPTS)]
    replies = [(a, k, r.result(timeout_s=120)) for a, k, r in sent]
    for a, k, reply in replies:
        assert reply["adapter"] == a
        assert reply["tokens"] == want[a][k]
    assert all(r["batch"] >= 1 and r["replica"].startswith("SERVE_REPLICA::test-shira#") for _, _, r in replies)


def test_errors_name_the_adapter(served):
    handle, _ = served
    with pytest.raises(UnknownAdapterError, match="no adapter named 'nope' on this replica; registered: "):
        Client(handle).submit("nope", PROMPTS[0], NEW).result(timeout_s=60)
    with pytest.raises(UnknownAdapterError, match="no adapter named 'nope'"):
        Client(handle, affinity=False).submit("nope", PROMPTS[0], NEW).result(timeout_s=60)
    payload = {"ids": PROMPTS[0], "adapter": "shira00"}
    with pytest.raises(BadRequestError, match="names adapter 'shira00' and model id 'shira01'"):
        handle.options(multiplexed_model_id="shira01").remote(payload).result(timeout_s=60)
    with pytest.raises(BadRequestError, match="a request is"):
        handle.remote([1, 2, 3]).result(timeout_s=60)
    assert issubclass(BadRequestError, ServeError)


def raw_post(body: bytes, adapter: str = "") -> tuple[int, dict]:
    req = urllib.request.Request(HTTP["url"], data=body, headers={"serve_multiplexed_model_id": adapter})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_http_answers_refused_requests_with_the_error_class_message_and_status(served):
    """404 for an unknown adapter, 400 for a bad payload, each with ``{"error": class, "message": ...}``; the
    HTTP client raises that class again. A right request still gets its adapter's tokens."""
    _, want = served
    status, body = raw_post(json.dumps({"ids": PROMPTS[0], "max_new_tokens": NEW}).encode(), "nope")
    assert status == 404 and body["error"] == "UnknownAdapterError"
    assert body["message"].startswith("no adapter named 'nope' on this replica; registered: ")
    status, body = raw_post(b"[1, 2, 3]")
    assert status == 400 and body["error"] == "BadRequestError" and body["message"].startswith("a request is")

    client = HttpClient(HTTP["url"], timeout_s=60)
    assert client.generate("shira01", PROMPTS[1], NEW)["tokens"] == want["shira01"][1]
    assert client.generate(None, PROMPTS[1], NEW)["tokens"] == want[None][1]
    with pytest.raises(UnknownAdapterError, match="no adapter named 'nope' on this replica") as info:
        client.generate("nope", PROMPTS[0], NEW)
    assert info.value.status == 404
    with pytest.raises(UnknownAdapterError, match="no adapter named 'nope'"):  # named in the payload instead
        client.post({"ids": PROMPTS[0], "adapter": "nope"})
    bad = {
        b"{not json": "the request body is not JSON",
        b"": "the request body is not JSON",
        json.dumps({"ids": ["a"]}).encode(): "'ids' must be a non-empty list of token ids",
        json.dumps({"ids": []}).encode(): "'ids' must be a non-empty list of token ids",
        json.dumps({"ids": [1], "max_new_tokens": -2}).encode(): "'max_new_tokens' must be a non-negative int, got -2",
        json.dumps({"ids": [1], "max_tokens": 3}).encode(): r"unknown keys \['max_tokens'\]",
        json.dumps({"ids": [1, 256]}).encode(): "token id 256 is past the vocabulary",
    }
    for body, message in bad.items():
        with pytest.raises(BadRequestError, match=message) as info:
            client.post(body)
        assert info.value.status == 400
    with pytest.raises(BadRequestError, match="names adapter 'shira00' and model id 'shira01'"):
        client.post({"ids": PROMPTS[0], "adapter": "shira00"}, adapter="shira01")


def test_a_killed_replica_is_replaced_and_answers_stay_right(served):
    """Kill one replica: Ray Serve starts another; requests sent meanwhile either fail with Ray's actor error or
    come back right; afterwards both replicas answer right."""
    from ray import serve

    handle, want = served
    client = Client(handle)
    victim = client.submit("shira00", PROMPTS[0], NEW).result(timeout_s=60)["replica"]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=False)
    failed = 0
    sent = [(a, k, client.submit(a, p, NEW)) for a in want for k, p in enumerate(PROMPTS)]
    for a, k, r in sent:
        try:
            reply = r.result(timeout_s=120)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):  # on the killed replica
            failed += 1
            continue
        assert reply["adapter"] == a and reply["tokens"] == want[a][k]
    assert failed < len(sent)
    deadline, replicas = time.monotonic() + 120, set()
    while time.monotonic() < deadline:
        status = serve.status().applications["test-shira"].deployments["AdapterServer"]
        if status.replica_states.get("RUNNING", 0) == 2:
            replicas = {client.submit(a, PROMPTS[1], NEW).result(timeout_s=60)["replica"] for a in want}
            if victim not in replicas:
                break
        time.sleep(1)
    assert status.replica_states.get("RUNNING", 0) == 2
    assert victim not in replicas
    for a in want:
        reply = client.submit(a, PROMPTS[2], NEW).result(timeout_s=60)
        assert reply["adapter"] == a and reply["tokens"] == want[a][2]


def test_stop_is_quiet(served, capfd):
    """Runs last in this module: ``stop()`` shuts Serve and the cluster down without Ray's "graceful_shutdown
    failed" message or any traceback (the fixture's own ``stop()`` then has nothing left to do)."""
    handle, want = served
    assert Client(handle).submit("shira02", PROMPTS[0], NEW).result(timeout_s=60)["tokens"] == want["shira02"][0]
    capfd.readouterr()
    stop()
    out, err = capfd.readouterr()
    assert not ray.is_initialized()
    for alarming in ("graceful_shutdown", "Traceback", "failed", "ERROR"):
        assert alarming not in out + err
    stop()  # stopping twice is harmless
