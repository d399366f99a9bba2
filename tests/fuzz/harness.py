"""One fuzz case under the contract, a time guard, and the counts.

The contract, for every case: the operation either raises a documented error class whose message names the
mutated file (its path or file name, or the bundle's directory), or it succeeds and behaves exactly like the
unmutated original (the same weights bit for bit after a switch; the same outputs for a bundle). Any other
exception is a failure, and so is a base left changed after the case or a case that runs past its budget.
"""

from __future__ import annotations

import faulthandler
import os
import random
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shira_runtime
import torch
from shira_runtime import AdapterFormatError, AdapterMismatchError, AdapterValueError, BaseMismatchError, Runtime

from tests.conftest import snapshot

SEED = int(os.environ.get("SHIRA_FUZZ_SEED", "20240611"))
CASE_BUDGET_S = float(os.environ.get("SHIRA_FUZZ_CASE_SECONDS", "10"))
DOCUMENTED = (AdapterFormatError, AdapterMismatchError, AdapterValueError, BaseMismatchError)  # BundleError too
FUZZED = "fuzzed"  # the name the adapter under test is registered as


def family_rng(family: str) -> random.Random:
    """Each family draws from its own stream: adding cases to one family does not reshuffle the others."""
    return random.Random(f"{SEED}/{family}")


@dataclass(frozen=True)
class Case:
    family: str
    index: int
    params: dict[str, Any]  # the mutation, enough to redo it by hand
    apply: Callable[[Path], None]  # mutates the copied artifact (a file or a directory) in place
    original: str = ""  # which original artifact the copy is made from
    target: str = ""  # the mutated file, relative to the artifact (bundles, directories)
    expect_adapters: dict[str, str] | None = None  # bundles: registered name -> original adapter it must equal

    def __str__(self) -> str:
        return f"{self.family}#{self.index} {self.original + ' ' if self.original else ''}{self.params}"


def on_bytes(fn: Callable[[bytes], bytes], rel: str = "") -> Callable[[Path], None]:
    """Apply a pure byte mutation to the file ``root/rel`` (or ``root`` itself)."""

    def run(root: Path) -> None:
        p = root / rel if rel else root
        p.write_bytes(fn(p.read_bytes()))

    return run


# -- the time guard --
class CaseTimeout(BaseException):  # not an Exception: code under test that catches Exception must not eat it
    pass


@contextmanager
def deadline(seconds: float):
    """Interrupt the case after ``seconds`` (SIGALRM); a hang inside native code that never returns to Python
    is ended by faulthandler after 3x the budget, with every thread's traceback (the run fails, it never hangs)."""
    main = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    if main:

        def expire(signum, frame):
            raise CaseTimeout(f"the case ran past its {seconds:.0f} s budget")

        old = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(3 * seconds, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        if main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


# -- outcomes and counts --
@dataclass
class Outcome:
    kind: str  # "raised" | "equal" | "failed"
    detail: str = ""  # what happened, for the report (failed) or SHIRA_FUZZ_VERBOSE=1 (all)
    group: str = ""  # failures with the same group are one defect: the same step, error class and raise site

    @staticmethod
    def failed(group: str, detail: str = "") -> Outcome:
        return Outcome("failed", detail or group, group)


@dataclass
class Tally:
    family: str
    cases: int = 0
    raised: int = 0
    equal: int = 0
    seconds: float = 0.0
    failures: list[tuple[Case, Outcome]] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.family}: {self.cases} cases, {self.raised} raised a documented error, {self.equal} loaded "
            f"equal, {len(self.failures)} broke the contract ({self.seconds:.1f} s)"
        )

    def report(self) -> str:
        """The failures grouped by what went wrong, each group with examples to reproduce."""
        groups: dict[str, list[tuple[Case, Outcome]]] = {}
        for case, out in self.failures:
            groups.setdefault(out.group, []).append((case, out))
        lines = [f"{self.line()}; SHIRA_FUZZ_SEED={SEED}"]
        for group, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"- {len(items)} x {group}")
            for case, out in items[:3]:
                lines.append(f"    {case}\n      -> {out.detail}")
            if len(items) > 3:
                lines.append(f"    ... and {', '.join(f'#{c.index}' for c, _ in items[3:])}")
        return "\n".join(lines)

    def check(self) -> None:
        """Fail the test with the grouped report (no traceback: the report is the message)."""
        if self.failures:
            pytest.fail(self.report(), pytrace=False)


TALLIES: dict[str, Tally] = {}  # every family run in this session (printed by conftest's terminal summary)
VERBOSE = os.environ.get("SHIRA_FUZZ_VERBOSE") == "1"  # print every case's outcome


def run_family(
    family: str, cases: list[Case], run: Callable[[Case], Outcome], budget_s: float = CASE_BUDGET_S
) -> Tally:
    """Run every case under the time guard and count its outcome."""
    tally = TALLIES[family] = Tally(family)
    t0 = time.perf_counter()
    for case in cases:
        start = time.perf_counter()
        try:
            with deadline(budget_s):
                out = run(case)
        except CaseTimeout as exc:
            out = Outcome.failed("hang: the case ran past its budget", f"hang: {exc}")
        took = time.perf_counter() - start
        if took > budget_s and out.kind != "failed":
            out = Outcome.failed("slow: over the case budget", f"took {took:.1f} s, over the {budget_s:.0f} s budget")
        if VERBOSE:
            print(f"  {case} -> {out.kind} {out.detail}")
        tally.cases += 1
        if out.kind == "raised":
            tally.raised += 1
        elif out.kind == "equal":
            tally.equal += 1
        else:
            tally.failures.append((case, out))
    tally.seconds = time.perf_counter() - t0
    print(tally.line())
    return tally


REPO = Path(shira_runtime.__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


def raise_site(exc: BaseException) -> str:
    """Where to fix it: the innermost frame in the project's code, then the frame that raised if elsewhere.

    An exception raised by this harness itself is a bug of the harness: it is re-raised, not counted."""
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    if not frames:
        return "?"
    files = [Path(f.filename).resolve() for f in frames]
    if files[-1].is_relative_to(HERE):
        raise exc
    ours = [i for i, p in enumerate(files) if p.is_relative_to(REPO) and not p.is_relative_to(HERE)]

    def at(i: int) -> str:
        name = files[i].relative_to(REPO) if files[i].is_relative_to(REPO) else files[i].name
        return f"{name}:{frames[i].lineno} in {frames[i].name}"

    if not ours:
        return at(len(frames) - 1)
    return at(ours[-1]) + ("" if ours[-1] == len(frames) - 1 else f" -> {at(len(frames) - 1)}")


def refusal(exc: BaseException, step: str, names: Iterable[str]) -> Outcome:
    """ "raised" if ``exc`` is a documented error whose message names one of ``names``; else the failure."""
    site = raise_site(exc)
    kind = type(exc).__name__
    msg = f"{kind}: {exc}"
    step_kind = re.sub(r"\('.*?'\)", "", step)  # switch('a') and switch('b') fail alike
    if not isinstance(exc, DOCUMENTED):
        return Outcome.failed(f"{step_kind}: undocumented {kind} (raised at {site})", f"{step}: undocumented {msg}")
    if not any(n and n in str(exc) for n in names):
        names = sorted(n for n in set(names) if n)
        return Outcome.failed(
            f"{step_kind}: {kind} whose message does not name the file (raised at {site})",
            f"{step}: the message names none of {names}: {msg}",
        )
    return Outcome("raised", f"{step}: {msg}")


# -- adapters on a torch module --
@dataclass
class AdapterWorld:
    module: torch.nn.Module
    pristine: dict[str, torch.Tensor]  # the base's tensors, to repair it after a case that broke it
    base: dict[str, torch.Tensor]  # bit snapshot of the base
    applied: dict[str, dict[str, torch.Tensor]]  # original -> bit snapshot of the weights after its switch

    def differing(self, snap: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
        return sorted(
            k for k in set(snap) | set(want) if k not in snap or k not in want or not torch.equal(snap[k], want[k])
        )

    def repair(self) -> None:
        with torch.no_grad():
            for k, v in self.module.state_dict().items():
                v.copy_(self.pristine[k])


def adapter_contract(world: AdapterWorld, path: Path, original: str) -> Outcome:
    """add_adapter(path), switch to it, switch(None): refused (documented, names the file) or equal."""
    step = "Runtime.load"
    try:
        rt = Runtime.load(world.module)
        step = "add_adapter"
        rt.add_adapter(FUZZED, path)
        step = "switch"
        rt.switch(FUZZED)
        after = snapshot(world.module)
        step = "switch(None)"
        rt.switch(None)
    except Exception as exc:
        out = refusal(exc, step, (path.name,))
    else:
        diff = world.differing(after, world.applied[original])
        out = (
            Outcome.failed(
                "accepted, but the switched weights differ from the original's", f"they differ in {_few(diff)}"
            )
            if diff
            else Outcome("equal")
        )
    changed = world.differing(snapshot(world.module), world.base)
    if changed:
        world.repair()
        return Outcome.failed(
            "the base is not bit-identical after the case", f"changed: {_few(changed)}; before that: {out.detail}"
        )
    return out


def _few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")


# -- bundles on onnxruntime --
@dataclass
class BundleWorld:
    root: Path  # the unmutated bundle
    example: dict[str, np.ndarray]  # the manifest's example input
    outputs: dict[str | None, list[np.ndarray]]  # None (base) or adapter -> outputs after switching to it
    adapters: frozenset[str]


def as_list(y: Any) -> list[np.ndarray]:
    return [np.asarray(a) for a in (y if isinstance(y, (list, tuple)) else [y])]


def same(y: Any, want: list[np.ndarray]) -> bool:
    got = as_list(y)
    return len(got) == len(want) and all(
        g.dtype == w.dtype and g.shape == w.shape and g.tobytes() == w.tobytes() for g, w in zip(got, want)
    )


def _delta(y: Any, want: list[np.ndarray]) -> str:
    got = as_list(y)
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return f"shapes {[g.shape for g in got]} vs {[w.shape for w in want]}"
    return f"max |diff| {max(float(np.max(np.abs(g.astype(np.float64) - w))) for g, w in zip(got, want)):.3g}"


def bundle_contract(world: BundleWorld, bundle: Path, case: Case) -> Outcome:
    """Runtime.load, one inference, each adapter switched and back: refused (documented, names the file or
    bundle) at any step, or every output equal to the unmutated bundle's; a refused switch changes nothing."""
    names = (bundle.name, Path(case.target).name if case.target else "")
    expected = case.expect_adapters if case.expect_adapters is not None else {n: n for n in world.adapters}
    base = world.outputs[None]
    refused, step = None, "Runtime.load"
    try:
        rt = Runtime.load(bundle)
        step = "inference"
        y = rt(**world.example)
        if not same(y, base):
            return Outcome.failed("loaded, but the base output differs from the original's", _delta(y, base))
        if set(rt.adapters) != set(expected):
            return Outcome.failed(
                "loaded, but registers other adapters than the original",
                f"registers {sorted(rt.adapters)}, expected {sorted(expected)}",
            )
        for name in sorted(expected):
            want = world.outputs[expected[name]]
            step = f"switch({name!r})"
            try:
                rt.switch(name)
            except Exception as exc:
                refused = refusal(exc, step, names)
                if refused.kind == "failed":
                    return refused
                y = rt(**world.example)
                if not same(y, base):
                    return Outcome.failed("a refused switch changed the outputs", f"{step}: {_delta(y, base)}")
                continue
            step = f"inference after switch({name!r})"
            y = rt(**world.example)
            if not same(y, want):
                return Outcome.failed(
                    "loaded, but after a switch the output differs from the original's", f"{step}: {_delta(y, want)}"
                )
            step = f"switch(None) after {name!r}"
            rt.switch(None)
            y = rt(**world.example)
            if not same(y, base):
                return Outcome.failed("switch(None) did not bring the base output back", f"{step}: {_delta(y, base)}")
    except Exception as exc:
        return refusal(exc, step, names)
    return refused or Outcome("equal")
