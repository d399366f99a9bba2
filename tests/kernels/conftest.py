"""Fixtures of the kernel tests: the C++ extension (skipped, not failed, when it cannot be built here) and its
dispatch knobs."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def ext():
    from shira_runtime.kernels import extension

    try:
        return extension.load()
    except Exception as exc:  # no compiler, no headers, ...
        pytest.skip(f"C++ extension unavailable: {exc}")


@pytest.fixture
def knobs(ext):
    """Set dispatch knobs for one test; defaults and thread count come back afterwards."""
    defaults = {k: v for k, v in ext.tuning().items() if not k.startswith("last_")}
    threads = torch.get_num_threads()

    def set_(threaded: bool | None = None, **kw):
        if threaded is not None:
            kw["serial_below"] = 0 if threaded else 1 << 62
            if threaded and torch.get_num_threads() < 2:
                torch.set_num_threads(2)
        ext.tuning(**kw)

    yield set_
    ext.tuning(**defaults)
    torch.set_num_threads(threads)
