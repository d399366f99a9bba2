"""Run Python code the way a device runs a bundle: in a fresh process where torch cannot be imported.

A meta-path hook (installed before anything else runs) makes ``import torch`` fail as it does where torch is not
installed, and the same for the packager's side (onnx, onnxscript, transformers, peft, safetensors.torch): what
the device path needs is numpy, onnxruntime, safetensors' numpy side, ml_dtypes and psutil. ``run`` also runs the
same code without the hook, so a test can compare the two processes' results bit for bit.

``SHIRA_DEVICE_PYTHON``: the interpreter of a real device install to run the blocked side with (CI: a venv with
only the built wheel and its base requirements, where torch is not installed at all); default: this one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

BLOCKED = ("torch", "onnx", "onnxscript", "transformers", "peft", "safetensors.torch", "diffusers")

BLOCKER = textwrap.dedent(
    f"""
    import importlib.abc, sys
    class _NoTorch(importlib.abc.MetaPathFinder):
        BLOCKED = {BLOCKED!r}
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in self.BLOCKED):
                raise ModuleNotFoundError(f"No module named {{name!r}} (the device test blocks it)", name=name)
            return None
    sys.meta_path.insert(0, _NoTorch())
    """
)

# appended to every script: which of the blocked packages the process ended up with (none, on the device path)
REPORT = textwrap.dedent(
    f"""
    import json as _json, sys as _sys
    print("DEVICE-MODULES " + _json.dumps(sorted({{m.split('.')[0] for m in _sys.modules}} & {set(BLOCKED)!r})))
    """
)


def run(code: str, *args: str, block: bool = True, timeout: float = 300) -> tuple[str, list[str]]:
    """Run ``code`` in a fresh interpreter (``sys.argv[1:] = args``); with ``block``, torch and the packager's
    packages cannot be imported. Returns (stdout, the blocked packages the process had imported)."""
    script = (BLOCKER if block else "") + textwrap.dedent(code) + REPORT
    env = dict(os.environ, PYTHONHASHSEED="0")
    python = (os.environ.get("SHIRA_DEVICE_PYTHON") or sys.executable) if block else sys.executable
    proc = subprocess.run(
        [python, "-c", script, *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if proc.returncode != 0:
        where = "without torch" if block else "with torch"
        raise AssertionError(f"the subprocess ({where}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    lines = proc.stdout.splitlines()
    modules = json.loads(next(line for line in reversed(lines) if line.startswith("DEVICE-MODULES "))[15:])
    return "\n".join(line for line in lines if not line.startswith("DEVICE-MODULES ")), modules
