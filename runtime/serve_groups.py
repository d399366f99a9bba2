"""One replica's scheduler: waiting requests grouped by adapter, one switch per group, one batched generation.

Pure Python and torch (no Ray): ``shira_runtime.serve`` runs one ``GroupWorker`` inside each Ray Serve replica, and the
tests drive it directly.

- ``AdapterGroups``: the waiting requests, one FIFO queue per group key ``(adapter, prompt length,
  max_new_tokens)`` (one key = one padded-free batch our decoders can run). ``take`` hands out a group: the active
  adapter's if it has requests waiting (no switch), unless it has already run ``max_stay`` groups in a row while
  another adapter waited; then the group whose oldest request is oldest (FIFO across adapters, so none starves).
- ``GroupWorker``: the one thread of a replica that switches and generates. For each group it switches once (if
  that adapter is not already active), generates the group as one batch, and answers each request with a
  ``Reply`` naming the adapter read from ``rt.active`` after the generation, not the one the request asked for.
  It is the only caller of ``rt.switch`` on its runtime; should anything else switch the runtime while a group
  generates, the group fails with ``ServeError`` instead of answering with tokens of an unknown adapter.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field

import torch
from shira_runtime.errors import ShiraError, UnknownAdapterError
from shira_runtime.manager import Runtime

Key = tuple[str | None, int, int]  # (adapter or None for the base, prompt length, max_new_tokens)


class ServeError(ShiraError, RuntimeError):
    """A request the replica could not answer correctly (closed scheduler, a foreign switch, a bad request)."""


class BadRequestError(ServeError, ValueError):
    """A request refused before it is queued: its payload is not ``{"ids": [token ids], "max_new_tokens": n}``
    (``"adapter"`` optional), or it names two different adapters. HTTP answers it with status 400."""


REQUEST_KEYS = ("ids", "max_new_tokens", "adapter")


def parse_request(
    payload: object, vocab: int | None = None, default_new_tokens: int = 16
) -> tuple[str | None, list[int], int]:
    """``(adapter, ids, max_new_tokens)`` of a request payload; ``BadRequestError`` saying what is wrong. With
    ``vocab``, a token id past the vocabulary is refused here (it would fail every request of its group)."""
    shape = "a request is {'ids': [token ids], 'max_new_tokens': n} (and 'adapter' without a model id)"
    if not isinstance(payload, dict) or "ids" not in payload:
        what = f"a dict with keys {sorted(map(str, payload))}" if isinstance(payload, dict) else type(payload).__name__
        raise BadRequestError(f"{shape}, got {what}")
    unknown = sorted(map(str, set(payload) - set(REQUEST_KEYS)))
    if unknown:
        raise BadRequestError(f"{shape}; unknown keys {unknown}")
    ids = payload["ids"]
    if (
        not isinstance(ids, (list, tuple))
        or not ids
        or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
    ):
        raise BadRequestError(f"'ids' must be a non-empty list of token ids (ints >= 0), got {ids!r:.80}")
    if vocab is not None and max(ids) >= vocab:
        raise BadRequestError(f"token id {max(ids)} is past the vocabulary ({vocab} tokens: ids 0..{vocab - 1})")
    new = payload.get("max_new_tokens", default_new_tokens)
    if isinstance(new, bool) or not isinstance(new, int) or new < 0:
        raise BadRequestError(f"'max_new_tokens' must be a non-negative int, got {new!r:.80}")
    adapter = payload.get("adapter")
    if adapter is not None and not isinstance(adapter, str):
        raise BadRequestError(f"'adapter' must be a name (a string) or null, got {adapter!r:.80}")
    return adapter, list(ids), new


@dataclass
class Job:
    """One waiting request: its prompt, what it asked for, and the future its ``Reply`` is set on."""

    adapter: str | None
    ids: tuple[int, ...]
    max_new_tokens: int
    seq: int  # arrival order on this replica
    queued_at: float  # time.perf_counter() at arrival
    future: Future = field(default_factory=Future)

    @property
    def key(self) -> Key:
        return (self.adapter, len(self.ids), self.max_new_tokens)


@dataclass(frozen=True)
class Reply:
    """The answer to one request. ``adapter`` is what produced ``tokens`` (read from the runtime), None = base."""

    adapter: str | None
    tokens: list[int]  # the new tokens, after the prompt
    replica: str  # the replica that ran it
    batch: int  # requests generated together with it (its group)
    switch_seq: int  # the replica's switch count once its group's adapter was active
    switched: bool  # this group's switch was made for it (False: the adapter was already active)
    switch_ms: float  # that switch's time (0 if none)
    queued_ms: float  # arrival on the replica -> its group taken
    generate_ms: float  # the group's generation

    def as_dict(self) -> dict:
        return asdict(self)


def adapter_name(active: Sequence[tuple[str, float]]) -> str | None:
    """``rt.active`` as the one name a reply carries: None for the base, ``name`` for one adapter at weight 1,
    else ``"a*0.5+b*1"`` (a fused combination; the server itself only switches single adapters)."""
    if not active:
        return None
    if len(active) == 1 and active[0][1] == 1.0:
        return active[0][0]
    return "+".join(f"{n}*{w:g}" for n, w in active)


class AdapterGroups:
    """Waiting requests by group key; ``take`` hands out one group at a time (see the module docstring)."""

    def __init__(self, max_batch: int = 8, max_stay: int = 4) -> None:
        if max_batch < 1 or max_stay < 1:
            raise ValueError(f"max_batch and max_stay must be >= 1, got {max_batch} and {max_stay}")
        self.max_batch, self.max_stay = max_batch, max_stay
        self._queues: dict[Key, deque[Job]] = {}
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._stay = 0  # groups the active adapter ran in a row
        self._closed: BaseException | None = None

    def put(self, adapter: str | None, ids: Sequence[int], max_new_tokens: int) -> Future:
        """Queue one request; its ``Reply`` (or error) arrives on the returned future."""
        ids = tuple(int(t) for t in ids)
        if not ids:
            raise BadRequestError("a request needs a non-empty prompt (token ids)")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise BadRequestError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        with self._cond:
            if self._closed is not None:
                raise ServeError(f"the scheduler is closed: {self._closed}")
            job = Job(adapter, ids, max_new_tokens, next(self._seq), time.perf_counter())
            self._queues.setdefault(job.key, deque()).append(job)
            self._cond.notify()
        return job.future

    @property
    def pending(self) -> int:
        with self._cond:
            return sum(len(q) for q in self._queues.values())

    def take(self, active: str | None, timeout: float | None = None) -> list[Job]:
        """The next group to run, given the adapter now ``active``; blocks until there is one (``[]`` after
        ``timeout`` seconds). Raises ``ServeError`` once closed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._closed is not None or self._queues, timeout):
                return []
            if self._closed is not None:
                raise ServeError(f"the scheduler is closed: {self._closed}")
            key = self._pick(active)
            queue = self._queues[key]
            group = [queue.popleft() for _ in range(min(self.max_batch, len(queue)))]
            if not queue:
                del self._queues[key]
            return group

    def _pick(self, active: str | None) -> Key:
        oldest = lambda keys: min(keys, key=lambda k: self._queues[k][0].seq)
        mine = [k for k in self._queues if k[0] == active]
        others_wait = len(mine) < len(self._queues)
        if mine and (self._stay < self.max_stay or not others_wait):
            self._stay += 1
            return oldest(mine)
        key = oldest([k for k in self._queues if k[0] != active] or mine)
        self._stay = 1
        return key

    def close(self, reason: str = "closed") -> None:
        """Refuse new requests and fail the waiting ones with ``ServeError(reason)``."""
        with self._cond:
            self._closed = ServeError(reason)
            waiting = [j for q in self._queues.values() for j in q]
            self._queues.clear()
            self._cond.notify_all()
        for job in waiting:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(ServeError(f"request not run: {reason}"))


class GroupWorker:
    """The thread that runs ``groups`` on ``rt``: one switch per group, one batched generation per group.

    ``switches`` and ``switch_ms`` count what it did; ``replica`` labels its replies.
    """

    def __init__(self, rt: Runtime, groups: AdapterGroups, replica: str = "local") -> None:
        self.rt, self.groups, self.replica = rt, groups, replica
        self.switches, self.switch_ms, self.served = 0, 0.0, 0
        self.error: BaseException | None = None  # what stopped the thread, if anything did
        self._thread = threading.Thread(target=self._loop, name=f"shira-serve-{replica}", daemon=True)

    def start(self) -> GroupWorker:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, reason: str = "the replica is shutting down", timeout: float = 30.0) -> None:
        self.groups.close(reason)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _loop(self) -> None:
        try:
            while True:
                group = self.groups.take(adapter_name(self.rt.active))
                self.run_group(group)
        except ServeError:  # closed
            return
        except BaseException as exc:  # anything else is a bug: record it for the health check
            self.error = exc
            self.groups.close(f"the replica's worker stopped: {exc!r}")

    def run_group(self, group: list[Job]) -> None:
        """Switch to the group's adapter (if needed), generate it as one batch, answer every job."""
        jobs = [j for j in group if j.future.set_running_or_notify_cancel()]  # the caller gave up on the others
        if not jobs:
            return
        adapter, taken = jobs[0].adapter, time.perf_counter()
        try:
            switched, switch_ms = False, 0.0
            if adapter_name(self.rt.active) != adapter:
                stats = self.rt.switch(adapter)
                self.switches += 1
                self.switch_ms += stats.ms
                switched, switch_ms = True, stats.ms
            before = self.rt.active
            if adapter_name(before) != adapter:
                raise ServeError(f"switched to {adapter!r} but {adapter_name(before)!r} is active")
            ids = torch.tensor([j.ids for j in jobs], dtype=torch.long)  # one key: one prompt length
            t0 = time.perf_counter()
            out = self.rt.generate(ids, max_new_tokens=jobs[0].max_new_tokens)
            generate_ms = (time.perf_counter() - t0) * 1e3
            if self.rt.active != before:  # only this thread switches; anything else is a foreign switch
                raise ServeError(
                    f"the active adapter changed from {adapter_name(before)!r} to {adapter_name(self.rt.active)!r} "
                    "during a generation: something other than this replica's worker switched its runtime"
                )
        except Exception as exc:  # a failed switch changed nothing (atomic); the group gets the error
            err = exc if isinstance(exc, (ShiraError, ValueError)) else ServeError(f"group of {adapter!r}: {exc!r}")
            for j in jobs:
                j.future.set_exception(err)
            return
        produced = adapter_name(before)
        self.served += len(jobs)
        eos = end_tokens(self.rt)
        for j, row in zip(jobs, out):
            reply = Reply(
                adapter=produced,
                tokens=new_tokens(row.tolist(), len(j.ids), eos),
                replica=self.replica,
                batch=len(jobs),
                switch_seq=self.switches,
                switched=switched,
                switch_ms=switch_ms,
                queued_ms=(taken - j.queued_at) * 1e3,
                generate_ms=generate_ms,
            )
            j.future.set_result(reply)


def end_tokens(rt: Runtime) -> list[int]:
    """The end tokens ``rt.generate`` stops a row at by default (the model's own: a bundle's manifest, a
    transformers model's generation config); empty when it has none."""
    decoder = getattr(rt.backend, "decoder", None)
    if decoder is not None:
        eos = decoder.get("eos_token_id")
    else:
        config = getattr(getattr(rt.backend, "module", None), "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def new_tokens(row: Sequence[int], prompt_len: int, eos: Sequence[int]) -> list[int]:
    """A generated row's new tokens up to and including its first end token: what a batch of one returns. In a
    batch, a row that ended early is filled with padding until the others end; the padding is no answer, and
    without this cut a reply would depend on which requests shared its group."""
    out = [int(t) for t in row[prompt_len:]]
    for i, t in enumerate(out):
        if t in eos:
            return out[: i + 1]
    return out


def vocab_size(rt: Runtime) -> int | None:
    """The number of token ids ``rt``'s model takes: its input embedding's rows (torch backend) or the last dim of
    the bundle's logits output; None where neither says."""
    module = getattr(rt.backend, "module", None)
    if module is not None:
        get = getattr(module, "get_input_embeddings", None)
        embedding = get() if callable(get) else None
        if not isinstance(embedding, torch.nn.Embedding):
            embedding = next((m for m in module.modules() if isinstance(m, torch.nn.Embedding)), None)
        return embedding.num_embeddings if embedding is not None else None
    manifest = getattr(rt.backend, "manifest", None)
    if manifest is None or not manifest.outputs:
        return None
    logits = (getattr(rt.backend, "decoder", None) or {}).get("logits", manifest.outputs[0]["name"])
    shape = next((o["shape"] for o in manifest.outputs if o["name"] == logits), [])
    return shape[-1] if shape and isinstance(shape[-1], int) else None


def check_adapter(rt: Runtime, adapter: str | None) -> str | None:
    """``adapter`` if ``rt`` has it registered (None = the base), else ``UnknownAdapterError`` naming both."""
    if adapter is not None and adapter not in rt.adapters:
        raise UnknownAdapterError(f"no adapter named {adapter!r} on this replica; registered: {list(rt.adapters)}")
    return adapter
