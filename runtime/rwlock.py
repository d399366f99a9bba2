"""A readers-writer lock: many inferences at once, or one switch.

Phase-fair: a waiting switch blocks newly arriving inferences, and the inferences that waited through a switch
all go before the next switch, so neither side starves however often the other comes.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager


class RWLock:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0  # holding the lock
        self._readers_waiting = 0
        self._reader_quota = 0  # readers let in ahead of waiting writers after a write
        self._writer = False
        self._writers_waiting = 0
        # one context object per side, stateless (the state is the lock's): no generator per ``with`` (contextlib's
        # frames). With one, taking and leaving the lock were ~26 us of a cold 4-tensor switch (timestamps in a
        # one-off script); the whole switch 23.1-23.7 -> 20.4-20.8 us warm with this and switch(name)'s fast path
        self._read, self._write = _Read(self), _Write(self)

    def read(self) -> AbstractContextManager[None]:
        """Hold the lock for reading (an inference) for the ``with`` block."""
        return self._read

    def write(self) -> AbstractContextManager[None]:
        """Hold the lock for writing (a switch) for the ``with`` block."""
        return self._write

    def _acquire_read(self) -> None:
        with self._cond:
            self._readers_waiting += 1
            try:
                while self._writer or (self._writers_waiting and not self._reader_quota):
                    self._cond.wait()
            finally:
                self._readers_waiting -= 1
                self._reader_quota = min(self._reader_quota, self._readers_waiting + 1)
            if self._reader_quota:
                self._reader_quota -= 1
            self._readers += 1

    def _release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def _acquire_write(self) -> None:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writer or self._readers or self._reader_quota:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True

    def _release_write(self) -> None:  # idempotent: safe to run again
        with self._cond:
            self._writer = False
            self._reader_quota = self._readers_waiting
            self._cond.notify_all()


class _Read:
    __slots__ = ("_lock",)

    def __init__(self, lock: RWLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock._acquire_read()

    def __exit__(self, *exc: object) -> None:
        self._lock._release_read()


class _Write:
    __slots__ = ("_lock",)

    def __init__(self, lock: RWLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock._acquire_write()

    def __exit__(self, *exc: object) -> None:
        _through_interrupts(self._lock._release_write)


def _through_interrupts(fn) -> None:
    """Run idempotent ``fn`` to the end even if a KeyboardInterrupt lands inside it (then raise that once):
    a switch interrupted while it releases the lock must not leave the lock held."""
    interrupt = None
    while True:
        try:
            fn()
            break
        except KeyboardInterrupt as exc:
            interrupt = exc
    if interrupt is not None:
        raise interrupt
