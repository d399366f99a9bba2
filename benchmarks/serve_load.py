"""Many users, many adapters: a load test of ``shira_runtime.serve`` on a local Ray cluster (loopback only, bounded).

    python -m benchmarks.serve_load                 # small preset, 2 replicas, 16 SHiRA adapters, ~5 minutes
    python -m benchmarks.serve_load --quick         # tiny preset, shorter runs (< 3 minutes)

An open-loop load generator (Poisson arrivals at a fixed mean rate; adapters drawn with Zipf popularity; prompts
of one length from a fixed pool) sends the same request sequence three ways, in ``rounds`` runs each, the three
taking turns (the machine is shared: a slow spell then hits them alike):
- ``affinity``: SHiRA adapters, the adapter as Ray's multiplexed model id (Ray routes to a replica claiming it);
- ``round_robin``: the same deployment, the adapter in the payload (Ray routes adapter-blind, by queue length);
- ``unfused_lora``: a second deployment with LoRA adapters registered unfused (a switch writes no weight; every
  token pays the extra ``x @ A.T @ B.T`` matmuls), affinity routing.
Both deployments are started once (2 replicas each, idle while the other runs).
Every reply is checked against the driver's own runtime (same seeds, same code): ``wrong`` counts replies whose
adapter or tokens differ from what that adapter generates offline, and must be 0. Latency runs from a request's
scheduled arrival to its reply. Switches are counted from the replies (each names its replica's switch count).

A last run (on unless ``--no-kill``) repeats ``affinity`` and kills one replica actor mid-run (``ray.kill``
with ``no_restart=False``): Ray Serve replaces it; a request that fails with Ray's actor error is retried (up to
``RETRIES`` times); the result says how many failed, were retried, and how soon a new replica answered.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from shira_runtime.models import PRESETS
from shira_runtime.serve import Client, RuntimeSpec, ServeConfig, Synthetic, bank_bytes, expected
from shira_runtime.table import print_table

from benchmarks.common import progress

RETRIES = 2
ROUTINGS = ("affinity", "round_robin", "unfused_lora")
TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Config:
    preset: str
    adapters: int
    zipf: float  # popularity of the i-th adapter ~ 1 / (i + 1) ** zipf
    rate_rps: float  # mean arrival rate (Poisson)
    duration_s: float  # seconds of arrivals per routing, split into ``rounds`` taking turns
    rounds: int
    prompt: int  # tokens per prompt
    prompts: int  # distinct prompts in the pool
    new_tokens: int
    replicas: int
    max_batch: int
    max_ongoing: int  # requests a replica accepts at once; past it Ray tries another replica (load balance)
    density: float  # SHiRA
    std: float  # adapter deltas: big enough to change greedy outputs
    lora_rank: int
    seed: int
    kill_s: float  # the kill-a-replica run: seconds of arrivals (0: no such run); the kill comes at a quarter


DEFAULT = Config("small", 16, 1.1, 6.0, 30.0, 3, 16, 16, 8, 2, 8, 8, 0.01, 0.05, 16, 0, 40.0)
QUICK = Config("tiny", 8, 1.1, 30.0, 10.0, 2, 16, 16, 8, 2, 8, 8, 0.01, 0.2, 16, 0, 20.0)


@dataclass(frozen=True)
class Row:
    routing: str  # affinity / round_robin / unfused_lora
    requests: int  # answered
    failed: int  # no answer after the retries
    retried: int  # answered after a retry
    throughput_rps: float  # answered / (first arrival -> last answer)
    p50_ms: float
    p99_ms: float
    switches: int
    switches_per_s: float
    switches_per_request: float
    switch_ms: float  # the replicas' time in switches, summed
    mean_batch: float
    busiest_share: float  # the share of replies that came from the busiest replica (load concentration)
    wrong: int  # replies whose adapter or tokens differ from the offline answer (all replies are checked)
    distinct: float  # share of replies whose right answer differs from the base's: what the check can tell apart


@dataclass(frozen=True)
class Arrival:
    at_s: float
    adapter: str
    prompt: int  # index into the pool


@dataclass
class Outcome:
    arrival: Arrival
    reply: dict | None = None
    done_s: float = 0.0  # since the run's start
    attempts: int = 0
    error: str = ""

    @property
    def latency_ms(self) -> float:
        return (self.done_s - self.arrival.at_s) * 1e3


def specs(cfg: Config) -> dict[str, RuntimeSpec]:
    shira = Synthetic(cfg.adapters, "shira", density=cfg.density, std=cfg.std, seed=cfg.seed + 1)
    lora = Synthetic(cfg.adapters, "lora", rank=cfg.lora_rank, std=cfg.std, seed=cfg.seed + 1, mode="unfused")
    return {"shira": RuntimeSpec(cfg.preset, synthetic=shira), "lora": RuntimeSpec(cfg.preset, synthetic=lora)}


def workload(cfg: Config, names: list[str], duration_s: float, part: int = 0) -> tuple[list[list[int]], list[Arrival]]:
    """The prompt pool and ``duration_s`` of arrivals (Poisson times, Zipf adapters); ``part`` draws another
    stretch of arrivals over the same pool. The same for every routing."""
    rng = random.Random(cfg.seed)
    vocab = PRESETS[cfg.preset].vocab
    pool = [[rng.randrange(1, vocab) for _ in range(cfg.prompt)] for _ in range(cfg.prompts)]
    rng = random.Random(f"{cfg.seed}:{part}")
    weights = [1.0 / (i + 1) ** cfg.zipf for i in range(len(names))]
    arrivals, t = [], 0.0
    while True:
        t += rng.expovariate(cfg.rate_rps)
        if t >= duration_s:
            return pool, arrivals
        arrivals.append(Arrival(t, rng.choices(names, weights)[0], rng.randrange(cfg.prompts)))


def offline(spec: RuntimeSpec, pool: list[list[int]], new_tokens: int) -> tuple[dict, dict[str, int]]:
    """Every (adapter, prompt)'s right answer from the driver's own runtime, and the bank's bytes per adapter."""
    rt = spec.build()  # one thread, as in a replica
    table = {}
    for adapter in [None, *rt.adapters]:
        for k, tokens in enumerate(expected(rt, adapter, pool, new_tokens)):
            table[adapter, k] = tokens
    return table, bank_bytes(rt)


def drive(client: Client, arrivals: list[Arrival], pool: list[list[int]], cfg: Config, during=None) -> list[Outcome]:
    """Send ``arrivals`` open-loop (each at its time, whatever is still pending) and wait for every answer.

    ``during(start, outcomes)`` runs in a thread alongside (the replica killer)."""
    import ray

    outcomes = [Outcome(a) for a in arrivals]
    start = time.perf_counter()

    def one(o: Outcome) -> None:
        while True:
            o.attempts += 1
            try:
                o.reply = client.submit(o.arrival.adapter, pool[o.arrival.prompt], cfg.new_tokens).result(
                    timeout_s=TIMEOUT_S
                )
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                o.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                if o.attempts > RETRIES:
                    break
                time.sleep(0.25 * o.attempts)
            except Exception as exc:  # anything else is not retried: counted as failed, reported
                o.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
                break
        o.done_s = time.perf_counter() - start

    side = None
    if during is not None:
        side = threading.Thread(target=during, args=(start, outcomes), daemon=True)
        side.start()
    with ThreadPoolExecutor(max_workers=128) as pool_:
        for o in outcomes:
            delay = o.arrival.at_s - (time.perf_counter() - start)
            if delay > 0:
                time.sleep(delay)
            pool_.submit(one, o)
    if side is not None:
        side.join()
    return outcomes


def summarize(routing: str, segments: list[list[Outcome]], table: dict) -> Row:
    """One row from the outcomes of one or more runs (``segments``, each timed from its own start)."""
    outcomes = [o for seg in segments for o in seg]
    done = [o for o in outcomes if o.reply is not None]
    lat = sorted(o.latency_ms for o in done)
    pct = lambda q: lat[min(len(lat) - 1, round(q * (len(lat) - 1)))] if lat else float("nan")
    span = sum(
        max((o.done_s for o in seg if o.reply is not None), default=0.0)
        - min((o.arrival.at_s for o in seg), default=0.0)
        for seg in segments
        if seg
    )
    switches = {(o.reply["replica"], o.reply["switch_seq"]): o.reply["switch_ms"] for o in done if o.reply["switched"]}
    wrong = sum(
        o.reply["adapter"] != o.arrival.adapter or o.reply["tokens"] != table[o.arrival.adapter, o.arrival.prompt]
        for o in done
    )
    distinct = sum(table[o.arrival.adapter, o.arrival.prompt] != table[None, o.arrival.prompt] for o in done)
    n = max(1, len(done))
    return Row(
        routing=routing,
        requests=len(done),
        failed=len(outcomes) - len(done),
        retried=sum(o.attempts > 1 for o in done),
        throughput_rps=len(done) / span if span > 0 else 0.0,
        p50_ms=pct(0.5),
        p99_ms=pct(0.99),
        switches=len(switches),
        switches_per_s=len(switches) / span if span > 0 else 0.0,
        switches_per_request=len(switches) / n,
        switch_ms=sum(switches.values()),
        mean_batch=sum(o.reply["batch"] for o in done) / n,
        busiest_share=max(Counter(o.reply["replica"] for o in done).values(), default=0) / n,
        wrong=wrong,
        distinct=distinct / n,
    )


class Killer:
    """Kills a replica ``at_s`` into the run, at a moment when requests are in flight (up to 5 s later): the one
    that answered last. Then notes when a replica started after the kill answers."""

    def __init__(self, at_s: float, in_flight: int = 2) -> None:
        self.at_s, self.in_flight = at_s, in_flight
        self.victim, self.killed_s, self.before, self.flying = "", 0.0, set(), 0

    def __call__(self, start: float, outcomes: list[Outcome]) -> None:
        import ray

        time.sleep(max(0.0, self.at_s - (time.perf_counter() - start)))
        deadline = time.perf_counter() + 5.0
        while True:
            flying = sum(o.attempts > 0 and o.done_s == 0.0 for o in outcomes)
            if flying >= self.in_flight or time.perf_counter() > deadline:
                break
            time.sleep(0.002)
        answered = sorted((o for o in outcomes if o.reply is not None), key=lambda o: o.done_s)
        if not answered:
            return
        self.before = {o.reply["replica"] for o in answered}
        self.victim, self.flying = answered[-1].reply["replica"], flying
        self.killed_s = time.perf_counter() - start
        ray.kill(ray.get_actor(self.victim, namespace="serve"), no_restart=False)
        progress(f"killed replica {self.victim} at {self.killed_s:.1f} s, {flying} requests in flight")

    def result(self, outcomes: list[Outcome], app: str, row: Row) -> dict:
        from ray import serve

        new = [o.done_s for o in outcomes if o.reply is not None and o.reply["replica"] not in self.before]
        deadline, running = time.monotonic() + 60, 0
        while time.monotonic() < deadline:
            running = serve.status().applications[app].deployments["AdapterServer"].replica_states.get("RUNNING", 0)
            if running >= 2:
                break
            time.sleep(1)
        errors = Counter(o.error.split(":")[0] for o in outcomes if o.error)
        return {
            "killed": self.victim,
            "killed_at_s": self.killed_s,
            "in_flight_at_kill": self.flying,
            "new_replica_answered_after_s": (min(new) - self.killed_s) if new else None,
            "replicas_running_after": running,
            "requests": row.requests,
            "failed": row.failed,
            "retried": row.retried,
            "errors": dict(errors),
            "wrong": row.wrong,
            "p99_ms": row.p99_ms,
        }


def measure(cfg: Config, routings: tuple[str, ...] = ROUTINGS) -> tuple[list[Row], dict | None, dict]:
    """Each routing in ``cfg.rounds`` runs, the routings taking turns (a slow spell of a shared machine hits
    them alike) over deployments started once; then the kill-a-replica run."""
    from ray import serve
    from shira_runtime.serve import run, start_local, stop

    spec = specs(cfg)
    names, lora_names = spec["shira"].synthetic.names(), spec["lora"].synthetic.names()
    part_s = cfg.duration_s / cfg.rounds
    pool = workload(cfg, names, 0.0)[0]
    parts = [workload(cfg, names, part_s, r)[1] for r in range(cfg.rounds)]
    to_lora = lambda arr: [replace(a, adapter=lora_names[names.index(a.adapter)]) for a in arr]
    kinds = {"affinity": "shira", "round_robin": "shira", "unfused_lora": "lora"}
    needed = {kinds[r] for r in routings}
    progress(f"{sum(map(len, parts))} arrivals per routing in {cfg.rounds} runs; offline answers for every adapter")
    tables, memory = {}, {}
    for kind in sorted(needed):
        tables[kind], per = offline(spec[kind], pool, cfg.new_tokens)
        memory[kind] = sum(per.values()) / max(1, len(per))
    serve_cfg = ServeConfig(
        replicas=cfg.replicas, max_batch=cfg.max_batch, max_ongoing_requests=cfg.max_ongoing, replica_cpus=0.5
    )
    apps = {kind: replace(serve_cfg, name=f"serve-load-{kind}") for kind in needed}
    progress("starting a local Ray cluster (loopback)")
    start_local(num_cpus=2)
    try:
        clients = {}
        for kind, app in apps.items():
            progress(f"deploying {cfg.replicas} replicas of {cfg.preset} with {cfg.adapters} {kind} adapters")
            handle = run(spec[kind], app)
            for a in lora_names if kind == "lora" else names:  # warm-up (not counted): one request per adapter
                Client(handle).submit(a, pool[0], cfg.new_tokens).result(timeout_s=TIMEOUT_S)
            clients[kind] = handle
        segments: dict[str, list[list[Outcome]]] = {r: [] for r in routings}
        for r, arrivals in enumerate(parts):
            order = list(routings[r % len(routings) :] + routings[: r % len(routings)])  # who goes first rotates
            for routing in order:
                client = Client(clients[kinds[routing]], affinity=routing != "round_robin")
                arr = to_lora(arrivals) if routing == "unfused_lora" else arrivals
                progress(f"[{routing}] run {r + 1}/{cfg.rounds}: {len(arr)} requests at {cfg.rate_rps} rps")
                segments[routing].append(drive(client, arr, pool, cfg))
        rows = [summarize(r, segments[r], tables[kinds[r]]) for r in routings]
        for row in rows:
            progress(str(row))
        kill = None
        if cfg.kill_s:
            if "lora" in apps:
                serve.delete(apps["lora"].name)  # its CPUs go to the replica that replaces the killed one
            if "shira" not in apps:
                apps["shira"] = replace(serve_cfg, name="serve-load-shira")
                clients["shira"] = run(spec["shira"], apps["shira"])
                tables["shira"] = offline(spec["shira"], pool, cfg.new_tokens)[0]
            arrivals = workload(cfg, names, cfg.kill_s, cfg.rounds)[1]
            killer = Killer(0.25 * cfg.kill_s)
            progress(f"[kill] {len(arrivals)} requests at {cfg.rate_rps} rps, one replica killed at {killer.at_s} s")
            outcomes = drive(Client(clients["shira"]), arrivals, pool, cfg, during=killer)
            row = summarize("affinity", [outcomes], tables["shira"])
            kill = killer.result(outcomes, apps["shira"].name, row)
    finally:
        stop()
    return rows, kill, memory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_load", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny preset, shorter runs")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None)
    p.add_argument("--adapters", type=int, default=None)
    p.add_argument("--rate", type=float, default=None, help="requests per second (Poisson arrivals)")
    p.add_argument("--duration", type=float, default=None, help="seconds of arrivals per routing, all runs")
    p.add_argument("--rounds", type=int, default=None, help="runs per routing, the routings taking turns")
    p.add_argument("--max-ongoing", type=int, default=None, help="requests a replica accepts at once")
    p.add_argument("--routing", nargs="+", choices=ROUTINGS, default=list(ROUTINGS))
    p.add_argument("--no-kill", action="store_true", help="skip the kill-a-replica run")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    cfg = QUICK if args.quick else DEFAULT
    cfg = replace(
        cfg,
        preset=args.preset or cfg.preset,
        adapters=args.adapters or cfg.adapters,
        rate_rps=args.rate or cfg.rate_rps,
        duration_s=args.duration or cfg.duration_s,
        rounds=args.rounds or cfg.rounds,
        max_ongoing=args.max_ongoing or cfg.max_ongoing,
        kill_s=0.0 if args.no_kill else cfg.kill_s,
    )
    print(f"# serve_load: {cfg}", flush=True)
    rows, kill, memory = measure(cfg, tuple(args.routing))
    print_table(
        [
            "routing",
            "rps",
            "p50 ms",
            "p99 ms",
            "switches",
            "/s",
            "/request",
            "switch ms",
            "batch",
            "busiest",
            "requests",
            "wrong",
        ],
        [
            [
                r.routing,
                r.throughput_rps,
                r.p50_ms,
                r.p99_ms,
                r.switches,
                r.switches_per_s,
                r.switches_per_request,
                r.switch_ms,
                r.mean_batch,
                r.busiest_share,
                f"{r.requests} ({r.failed} failed)",
                r.wrong,
            ]
            for r in rows
        ],
    )
    per = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in memory.items())
    print(f"adapter bytes in a replica's bank, per adapter: {per}")
    if kill is not None:
        print(
            f"kill-a-replica: killed {kill['killed']} at {kill['killed_at_s']:.1f} s with {kill['in_flight_at_kill']} "
            f"requests in flight (on any replica); {kill['requests']} answered, "
            f"{kill['failed']} failed, {kill['retried']} retried ({kill['errors'] or 'no errors'}); "
            f"a new replica answered {kill['new_replica_answered_after_s']} s later; "
            f"{kill['replicas_running_after']} running after; wrong {kill['wrong']}",
            flush=True,
        )
    if args.json:
        doc = {"config": asdict(cfg), "rows": [asdict(r) for r in rows], "kill": kill, "bank_bytes_per_adapter": memory}
        args.json.write_text(json.dumps(doc, indent=1))
    return 1 if any(r.wrong for r in rows) or (kill and kill["wrong"]) else 0


if __name__ == "__main__":
    sys.exit(main())
