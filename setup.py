"""The one compiled part: the kernel core (kernels/csrc/shira_core.cpp), a plain C++ shared library with a C ABI
and no torch, no Python API. Built as the package's ``shira_runtime/kernels/_core*.so``, loaded with ctypes
(``shira_runtime.kernels.core``); everything else is in pyproject.toml."""

import hashlib
from pathlib import Path

from setuptools import Extension, setup

CSRC = Path("kernels/csrc")
# the id shira_runtime.kernels.core compares against the shipped source (an in-place build older than its source
# is recompiled into the cache at first use)
SOURCE_ID = hashlib.sha256(b"".join((CSRC / n).read_bytes() for n in ("shira_core.h", "shira_core.cpp"))).hexdigest()

setup(
    ext_modules=[
        Extension(
            "shira_runtime.kernels._core",
            sources=[str(CSRC / "shira_core.cpp")],
            language="c++",
            define_macros=[("SHIRA_SOURCE_ID", f'"{SOURCE_ID[:16]}"'), ("NDEBUG", None)],
            # -ffp-contract=off: every fp32 op rounded on its own, as torch computes (no fused multiply-add)
            extra_compile_args=["-O3", "-ffp-contract=off", "-std=c++17", "-fvisibility=hidden", "-pthread"],
            extra_link_args=["-pthread"],
        )
    ]
)
