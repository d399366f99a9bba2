"""The runtime on a local Ray Serve: 2 replicas over the tiny preset with 3 SHiRA adapters, every reply checked
against the driver's own runtime; the command-line server checked over HTTP; a killed replica replaced.

Skipped (with the reason) only where Ray is not installed or cannot start; CI installs it."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray Serve is not installed (pip install -e '.[serve]')")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[serve]')")

from shira_runtime import UnknownAdapterError  # noqa: E402
from shira_runtime.serve import Client, RuntimeSpec, ServeConfig, Synthetic, expected, run, start_local, stop  # noqa: E402
from shira_runtime.serve_groups import ServeError  # noqa: E402

SPEC = RuntimeSpec("tiny", synthetic=Synthetic(3, std=0.2))
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


@pytest.fixture(scope="module")
def served():
    try:
        start_local(num_cpus=2)
    except Exception as exc:  # no cluster can start on this machine: say why
        stop()
        pytest.skip(f"Ray cannot start here: {exc!r}")
    try:
        handle = run(SPEC, ServeConfig(replicas=2, max_batch=4, replica_cpus=0.5, name="test-shira"))
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
    with pytest.raises(ServeError, match="names adapter 'shira00' and model id 'shira01'"):
        handle.options(multiplexed_model_id="shira01").remote(payload).result(timeout_s=60)
    with pytest.raises(ServeError, match="a request is"):
        handle.remote([1, 2, 3]).result(timeout_s=60)


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
