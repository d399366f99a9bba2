"""Serving many adapters to many users: the runtime on Ray Serve, with adapter-affinity routing.

    python -m shira_runtime.serve BUNDLE_DIR --replicas 2               # HTTP on 127.0.0.1:8000, every bundled adapter
    python -m shira_runtime.serve small --synthetic 8 --check           # a preset with 8 random SHiRA adapters,
    self-test

Each replica holds one ``Runtime`` (over a bundle directory or a preset module) with every adapter registered,
and one ``GroupWorker`` (``shira_runtime.serve_groups``): waiting requests are grouped by adapter, the replica switches
once per group and generates the group as one batch. A request names its adapter by Ray's multiplexed model id
(``handle.options(multiplexed_model_id=name)``, or the HTTP header ``serve_multiplexed_model_id``; none for the
base) and carries a prompt: ``{"ids": [token ids], "max_new_tokens": n}``. The reply names the adapter that
produced it (read from the runtime, not from the request).

Over HTTP a refused request is answered ``{"error": class name, "message": ...}`` with status 404 (an unknown
adapter: ``UnknownAdapterError``), 400 (a bad payload: ``BadRequestError``) or 500 (anything else);
``HttpClient`` raises that class again on the client's side. Through a handle the error itself is raised.

What Ray calls a replica's loaded models is here the adapters the replica *claims* (``@serve.multiplexed``'s
LRU set, ``affinity_slots`` of them): Ray routes a request to a replica that claims its adapter, so each replica
keeps switching among a few adapters instead of all of them. Claiming costs nothing (every adapter is already in
memory on every replica) and an LRU eviction only drops the claim: the switch itself happens in the worker, per
group, never in Ray's loader. Without a model id (``affinity=False``; the adapter named in the payload) Ray
routes adapter-blind, by queue length: the round-robin baseline of ``benchmarks.serve_load``.

Ray is imported only by the functions that need it (``pip install -e ".[serve]"``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from shira_runtime import errors
from shira_runtime.errors import ShiraError, UnknownAdapterError
from shira_runtime.kernels.dtypes import by_short
from shira_runtime.manager import Runtime, dir_kind
from shira_runtime.models import PRESETS, TARGETS, build
from shira_runtime.serve_groups import (
    AdapterGroups,
    BadRequestError,
    GroupWorker,
    ServeError,
    check_adapter,
    end_tokens,
    new_tokens,
    parse_request,
    vocab_size,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Synthetic:
    """Random adapters made from seeds on a preset base: identical in every replica and in a checking driver."""

    count: int = 8
    kind: str = "shira"  # or "lora"
    density: float = 0.01  # shira: fraction of each target weight
    rank: int = 16  # lora
    std: float = 0.05  # large enough that adapters change greedy outputs (the wrong-adapter check needs it)
    seed: int = 1
    mode: str | None = None  # lora: "fused" (default) or "unfused"

    def names(self) -> list[str]:
        return [f"{self.kind}{i:02d}" for i in range(self.count)]

    def make(self, module: torch.nn.Module) -> dict[str, Any]:
        from shira_runtime.synthetic import random_lora, random_shira

        if self.kind == "shira":
            return {
                n: random_shira(module, TARGETS, self.density, seed=self.seed + i, std=self.std)
                for i, n in enumerate(self.names())
            }
        if self.kind == "lora":
            return {
                n: random_lora(module, TARGETS, self.rank, seed=self.seed + i, std=self.std)
                for i, n in enumerate(self.names())
            }
        raise ValueError(f"synthetic adapter kind {self.kind!r} is not 'shira' or 'lora'")


@dataclass(frozen=True)
class RuntimeSpec:
    """What one replica loads: ``base`` (a bundle directory, whose adapters are registered, a transformers model
    directory, or a preset name of ``shira_runtime.models``), extra ``adapters`` (name, our file or a PEFT
    directory), ``synthetic`` adapters (not on a bundle)."""

    base: str
    adapters: tuple[tuple[str, str], ...] = ()
    mode: str | None = None  # LoRA mode of ``adapters``
    synthetic: Synthetic | None = None
    dtype: str = "fp32"  # preset bases: a short name of shira_runtime.kernels.dtypes
    seed: int = 0  # preset bases' weights
    threads: int = 1  # torch / onnxruntime threads of one replica

    def is_model_dir(self) -> bool:
        """A transformers model directory (``config.json``, no bundle manifest): the torch backend serves it.
        ``BundleError`` for a directory that is neither that nor a bundle."""
        return self.base not in PRESETS and dir_kind(Path(self.base)) == "transformers"

    def is_bundle(self) -> bool:
        return self.base not in PRESETS and not self.is_model_dir()

    def resolved(self) -> RuntimeSpec:
        """The same spec with absolute paths: replicas may not run in the caller's directory."""
        base = str(Path(self.base).resolve()) if self.base not in PRESETS else self.base
        adapters = tuple((n, str(Path(p).resolve())) for n, p in self.adapters)
        return replace(self, base=base, adapters=adapters)

    def adapter_names(self) -> list[str]:
        """The names a replica registers, without building it (a bundle's come from its manifest)."""
        names = []
        if self.is_bundle():
            from shira_runtime.manifest import Manifest

            names += list(Manifest.read(Path(self.base)).adapters)
        names += [n for n, _ in self.adapters]
        names += self.synthetic.names() if self.synthetic else []
        return names

    def build(self) -> Runtime:
        """The runtime with every adapter registered; sets this process's torch threads to ``threads``."""
        torch.set_num_threads(self.threads)
        if self.is_bundle():
            from shira_runtime.onnx_backend import OnnxBackend

            if self.synthetic is not None:
                raise ValueError(f"synthetic adapters need a preset base, not the bundle {self.base}")
            rt = Runtime(OnnxBackend.open(Path(self.base), threads=self.threads))
            rt._register_bundled(Path(self.base), rt.backend.manifest)  # what Runtime.load(bundle) does
        else:
            if self.is_model_dir():
                rt = Runtime.load(Path(self.base))  # in the dtype it was saved in
            else:
                rt = Runtime.load(build(self.base, by_short(self.dtype).torch, self.seed))
            module = rt.backend.module
            for name, adapter in (self.synthetic.make(module) if self.synthetic else {}).items():
                rt.add_adapter(name, adapter, mode=self.synthetic.mode)
        for name, source in self.adapters:
            rt.add_adapter(name, source, mode=self.mode)
        return rt


@dataclass(frozen=True)
class ServeConfig:
    replicas: int = 2
    max_batch: int = 8  # requests generated together
    max_stay: int = 4  # groups the active adapter may run in a row while another adapter waits
    affinity_slots: int | None = None  # adapters a replica claims (Ray's max models); None: adapters / replicas
    max_ongoing_requests: int = 8  # per replica; past it Ray tries another replica (which then claims the adapter)
    replica_cpus: float = 1.0
    health_check_period_s: float = 2.0  # how soon a dead replica is noticed and replaced
    name: str = "shira"

    def slots(self, adapters: int) -> int:
        return self.affinity_slots or max(1, math.ceil(adapters / self.replicas))


def bank_bytes(rt: Runtime) -> dict[str, int]:
    """Bytes each registered (and already read) adapter keeps in the runtime's bank: indices and fp32 deltas for
    sparse adapters (and their runs and mirror orders, where found), the factors for LoRA. What a replica pays per
    adapter it keeps registered."""
    with rt._bank_lock:
        bank = dict(rt._bank)
    out = {}
    for name, p in bank.items():
        tensors = [t for pair in p.sparse.values() for t in pair] + [*p.runs.values(), *p.orders.values()]
        tensors += [t for a, b, _ in (*p.lora.values(), *p.unfused.values()) for t in (a, b)]
        out[name] = sum(int(t.nbytes) for t in tensors)
    return out


def deployment(spec: RuntimeSpec, cfg: ServeConfig = ServeConfig()):
    """The Ray Serve application (``serve.run`` it): ``cfg.replicas`` replicas, each over ``spec``."""
    import ray
    from ray import serve

    spec = spec.resolved()
    slots = cfg.slots(len(spec.adapter_names()))

    @serve.deployment(
        name="AdapterServer",
        num_replicas=cfg.replicas,
        max_ongoing_requests=cfg.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.replica_cpus},
        health_check_period_s=cfg.health_check_period_s,
    )
    class AdapterServer:
        def __init__(self, spec: RuntimeSpec, cfg: ServeConfig) -> None:
            self.rt = spec.build()
            self.replica = ray.get_runtime_context().get_actor_name() or "replica"
            self.groups = AdapterGroups(cfg.max_batch, cfg.max_stay)
            self.worker = GroupWorker(self.rt, self.groups, self.replica).start()
            self.vocab = vocab_size(self.rt)

        @serve.multiplexed(max_num_models_per_replica=slots)
        async def claim(self, model_id: str) -> str:
            """Ray's "load": the adapter is already registered, the claim only steers routing here."""
            return check_adapter(self.rt, model_id)

        async def __call__(self, request: Any) -> Any:
            """A handle's payload (its errors raise as themselves), or an HTTP request (errors become replies)."""
            if not hasattr(request, "json"):
                return await self.answer(request)
            from starlette.responses import JSONResponse

            try:
                try:
                    payload = await request.json()
                except ValueError as exc:  # not JSON, not UTF-8, empty
                    raise BadRequestError(f"the request body is not JSON ({exc})") from None
                return await self.answer(payload)
            except Exception as exc:
                status, body = error_reply(exc)
                if status >= 500:
                    log.error("replica %s: %s", self.replica, body["message"], exc_info=exc)
                return JSONResponse(body, status_code=status)

        async def answer(self, payload: Any) -> dict:
            adapter, ids, max_new_tokens = parse_request(payload, self.vocab)
            model_id = serve.get_multiplexed_model_id()
            if model_id:
                if adapter is not None and adapter != model_id:
                    raise BadRequestError(f"the request names adapter {adapter!r} and model id {model_id!r}")
                adapter = await self.claim(model_id)
            else:
                check_adapter(self.rt, adapter)
            future = self.groups.put(adapter, ids, max_new_tokens)
            return (await asyncio.wrap_future(future)).as_dict()

        def stats(self) -> dict:
            w = self.worker
            return {"replica": self.replica, "switches": w.switches, "switch_ms": w.switch_ms, "served": w.served}

        def check_health(self) -> None:
            if not self.worker.alive:
                raise ServeError(f"replica {self.replica}: its worker stopped ({self.worker.error!r})")

        def __del__(self) -> None:
            self.worker.stop()

    return AdapterServer.bind(spec, cfg)


def start_local(num_cpus: int | None = None, http_port: int | None = None, quiet: bool = True) -> None:
    """A Ray cluster on this machine only (loopback), and Serve: handles only, or HTTP on 127.0.0.1:``http_port``."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=not quiet,
        )
    logging_config = {"log_level": "WARNING" if quiet else "INFO"}
    if http_port is None:
        serve.start(proxy_location="Disabled", logging_config=logging_config)
    else:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port}, logging_config=logging_config)


def run(spec: RuntimeSpec, cfg: ServeConfig = ServeConfig(), http: bool = False):
    """Deploy (or redeploy) the application; returns its ``DeploymentHandle``."""
    from ray import serve

    return serve.run(deployment(spec, cfg), name=cfg.name, route_prefix="/" if http else None)


def stop() -> None:
    """Shut Serve and the local Ray cluster down (everything ``start_local`` started), quietly.

    Every application is deleted first (Ray stops its replicas, whose workers fail what still waits), then Ray
    shuts down, and Serve's controller and proxies end with the cluster. Not ``serve.shutdown()``: its task waits
    on the controller until the controller kills itself, and Ray then prints that task as failed ("Task
    ServeController.graceful_shutdown failed ... will be retried"), a harmless but alarming message."""
    import ray
    from ray import serve
    from ray.serve.exceptions import RayServeException

    if not ray.is_initialized():
        return
    try:
        apps = list(serve.status().applications)
    except RayServeException:  # Serve never started on this cluster
        apps = []
    for name in apps:
        serve.delete(name)
    ray.shutdown()


STATUS = {UnknownAdapterError: 404, BadRequestError: 400}  # anything else: 500
ERRORS = {
    c.__name__: c
    for c in (*vars(errors).values(), ServeError, BadRequestError)
    if isinstance(c, type) and issubclass(c, ShiraError)
}


def error_reply(exc: BaseException) -> tuple[int, dict]:
    """The HTTP status and JSON body that answer a request refused with ``exc``: the project's error class and
    message (an error of another kind, a bug, is reported as ``ServeError``)."""
    status = next((code for cls, code in STATUS.items() if isinstance(exc, cls)), 500)
    if isinstance(exc, ShiraError):
        cls = next(c for c in type(exc).__mro__ if c.__name__ in ERRORS)  # Ray may wrap it in a subclass
        return status, {"error": cls.__name__, "message": str(exc)}
    return status, {"error": "ServeError", "message": f"{type(exc).__name__}: {exc}"}


def error_from_reply(status: int, body: bytes) -> ShiraError:
    """The project's error an HTTP error reply carries (``error_reply``'s body); a ``ServeError`` naming the
    status for a reply that carries none (a proxy's own error). ``.status`` is the HTTP status."""
    try:
        data = json.loads(body)
        cls, message = ERRORS.get(data["error"]), str(data["message"])
    except (ValueError, TypeError, KeyError):
        cls, message = None, body.decode("utf-8", "replace")[:500]
    if cls is None:
        cls, message = ServeError, f"HTTP {status}: {message}"
    err = cls(message)
    err.status = status
    return err


@dataclass
class Client:
    """Requests to a deployment: with ``affinity`` the adapter is the multiplexed model id (Ray routes by it),
    without, it travels in the payload (Ray routes adapter-blind)."""

    handle: Any
    affinity: bool = True
    _handles: dict[str, Any] = field(default_factory=dict)

    def submit(self, adapter: str | None, ids: Sequence[int], max_new_tokens: int = 16):
        """A ``DeploymentResponse``; ``.result()`` is the reply dict (see ``shira_runtime.serve_groups.Reply``)."""
        payload = {"ids": [int(t) for t in ids], "max_new_tokens": max_new_tokens}
        if not self.affinity:
            return self.handle.remote({**payload, "adapter": adapter})
        key = adapter or ""
        if key not in self._handles:
            self._handles[key] = self.handle.options(multiplexed_model_id=key)
        return self._handles[key].remote(payload)


@dataclass(frozen=True)
class HttpClient:
    """Requests over HTTP to a deployment served with ``http=True`` (``python -m shira_runtime.serve``): the
    adapter travels as the multiplexed model id header. A refused request raises the server's error class here
    (``UnknownAdapterError`` for 404, ``BadRequestError`` for 400; see ``error_from_reply``)."""

    url: str = "http://127.0.0.1:8000/"
    timeout_s: float = 120.0

    def generate(self, adapter: str | None, ids: Sequence[int], max_new_tokens: int = 16) -> dict:
        """The reply dict (see ``shira_runtime.serve_groups.Reply``)."""
        return self.post({"ids": [int(t) for t in ids], "max_new_tokens": max_new_tokens}, adapter)

    def post(self, payload: Any, adapter: str | None = None) -> dict:
        """Send ``payload`` (JSON-encoded, or raw ``bytes`` as they are) with ``adapter`` as the model id."""
        import urllib.error
        import urllib.request

        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        req = urllib.request.Request(
            self.url,
            data=data,
            headers={"serve_multiplexed_model_id": adapter or "", "content-type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise error_from_reply(exc.code, exc.read()) from None


def expected(rt: Runtime, adapter: str | None, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list:
    """The new tokens ``rt`` generates for ``prompts`` with ``adapter`` active: the offline answer a reply is
    checked against (prompts of one length go as one batch; each row cut after its end token, as replies are)."""
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    out: list = [None] * len(prompts)
    eos = end_tokens(rt)
    with rt.using(adapter):
        for n, rows in by_len.items():
            ids = torch.tensor([list(prompts[i]) for i in rows], dtype=torch.long)
            for i, row in zip(rows, rt.generate(ids, max_new_tokens=max_new_tokens)):
                out[i] = new_tokens(row.tolist(), n, eos)
    return out


def _http_check(spec: RuntimeSpec, port: int, max_new_tokens: int) -> int:
    """Three prompts per adapter and for the base over HTTP, each reply checked against the driver's own runtime
    (same files or seeds, same code); returns how many were wrong."""
    client = HttpClient(f"http://127.0.0.1:{port}/")
    rt = spec.build()
    prompts = [[1 + (7 * i + 31 * k) % 200 for i in range(8)] for k in range(3)]
    bad = 0
    for adapter in [None, *rt.adapters]:
        want = expected(rt, adapter, prompts, max_new_tokens)
        for prompt, tokens in zip(prompts, want):
            reply = client.generate(adapter, prompt, max_new_tokens)
            ok = reply["adapter"] == adapter and reply["tokens"] == tokens
            bad += not ok
            name = adapter or "(base)"
            print(f"{name:>12}: {'ok   ' if ok else 'WRONG'} {reply['tokens']} from {reply['replica']}", flush=True)
    return bad


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m shira_runtime.serve",
        description="Serve a bundle (or a preset) and its adapters on a local Ray Serve.",
    )
    p.add_argument("base", help="a bundle directory (its adapters are served) or a preset name: " + str(list(PRESETS)))
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", help="one more adapter (repeat)")
    p.add_argument("--mode", choices=["fused", "unfused"], default=None, help="LoRA mode of --adapter adapters")
    p.add_argument("--synthetic", type=int, default=0, help="N random SHiRA adapters (preset bases: a demo)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="threads per replica")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--affinity-slots", type=int, default=None, help="adapters a replica claims (default: n/replicas)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs the local Ray cluster may use")
    p.add_argument("--port", type=int, default=8000, help="HTTP port on 127.0.0.1")
    p.add_argument("--check", action="store_true", help="answer one request per adapter over HTTP, check, exit")
    p.add_argument("--max-new-tokens", type=int, default=8, help="for --check")
    args = p.parse_args(argv)
    adapters = []
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--adapter {item!r}: expected NAME=PATH")
        adapters.append((name, path))
    if args.base not in PRESETS and not Path(args.base).is_dir():
        p.error(f"{args.base!r} is neither a directory (a bundle or a transformers model) nor a preset {list(PRESETS)}")
    spec = RuntimeSpec(
        args.base,
        tuple(adapters),
        args.mode,
        Synthetic(args.synthetic) if args.synthetic else None,
        threads=args.threads,
    )
    cfg = ServeConfig(
        replicas=args.replicas,
        max_batch=args.max_batch,
        affinity_slots=args.affinity_slots,
        replica_cpus=min(1.0, args.threads),
    )
    try:  # what can be checked here, before any cluster starts
        spec.adapter_names()
        if spec.is_bundle() and spec.synthetic is not None:
            raise ValueError(f"--synthetic adapters need a preset or a transformers model, not the bundle {spec.base}")
    except (ShiraError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        start_local(args.num_cpus, http_port=args.port, quiet=args.check)
    except Exception as exc:  # no cluster on this machine: say so (exit 3), nothing was deployed
        stop()
        print(f"Ray cannot start here: {exc!r}", file=sys.stderr)
        return 3
    try:
        run(spec, cfg, http=True)
        names = spec.adapter_names()
        print(f"serving {len(names)} adapters {names} on {cfg.replicas} replicas at http://127.0.0.1:{args.port}/")
        if args.check:
            bad = _http_check(spec, args.port, args.max_new_tokens)
            print("all replies right" if not bad else f"{bad} WRONG replies")
            return 1 if bad else 0
        body = '{"ids": [1, 2, 3], "max_new_tokens": 8}'
        header = f"serve_multiplexed_model_id: {names[0] if names else ''}"
        print(f"try: curl -s 127.0.0.1:{args.port}/ -H '{header}' -d '{body}'   (Ctrl-C stops)", flush=True)
        done = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: done.set())
        try:
            while not done.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        stop()


if __name__ == "__main__":
    sys.exit(main())
