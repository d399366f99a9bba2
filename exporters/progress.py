"""Progress of long exports and packaging: tqdm bars on stderr, one step per named phase.

``enabled=None`` (the default everywhere) leaves the choice to tqdm: shown when stderr is a terminal, silent when
it is a file or a pipe (logs, CI, tests). ``True`` shows it anyway, ``False`` never.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from tqdm import tqdm


class Phases:
    """A bar over ``phases``: ``step(name)`` closes the phase that ran and shows ``name`` as the one running."""

    def __init__(self, desc: str, phases: Sequence[str], enabled: bool | None = None) -> None:
        self.bar = tqdm(
            total=len(phases),
            desc=desc,
            file=sys.stderr,
            disable=None if enabled is None else not enabled,
            bar_format="{desc} {n_fmt}/{total_fmt} [{elapsed}]",
            dynamic_ncols=True,
        )
        self.enabled = enabled
        self.desc = desc
        self.running: str | None = None

    def step(self, phase: str) -> None:
        if self.running is not None:
            self.bar.update(1)
        self.running = phase
        self.bar.set_description_str(f"{self.desc}: {phase}")

    def close(self) -> None:
        if self.running is not None:
            self.bar.update(1)
            self.running = None
        self.bar.close()

    def __enter__(self) -> Phases:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()  # on an error the bar stops where it failed


def byte_bar(desc: str, total: int, enabled: bool | None = None) -> tqdm:
    """A bar over ``total`` bytes (written or read)."""
    return tqdm(
        total=total,
        desc=desc,
        file=sys.stderr,
        disable=None if enabled is None else not enabled,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        leave=False,
        dynamic_ncols=True,
    )
