"""The distribution installs one import package, ``shira_runtime``: it never shadows another distribution's
``kernels`` (Hugging Face's, which transformers needs), ``runtime``, ``exporters`` or ``benchmarks``, whether
Python runs from the repository root (where the root is on ``sys.path``) or from anywhere else."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_one_top_level_import_package():
    # the installed record, not the egg-info an editable build leaves in the checkout (the root is on sys.path)
    paths = [p for p in sys.path if p and Path(p).resolve() != ROOT]
    dist = next(iter(importlib.metadata.distributions(name="shira-runtime", path=paths)))  # the first on the path
    files = [Path(str(f)) for f in dist.files or [] if not str(f).startswith("..")]  # ../bin: the scripts
    # an editable install adds its import hook (__editable__*.pth, the finder module and its .pyc)
    tops = {f.parts[0] for f in files if not f.name.startswith("__editable__")}
    ours = {t for t in tops if not t.endswith(".dist-info")}
    assert ours <= {"shira_runtime"}, f"the distribution installs other top-level names: {sorted(ours)}"
    assert (dist.read_text("top_level.txt") or "shira_runtime").split() == ["shira_runtime"]


def test_generic_names_stay_free_outside_the_checkout(tmp_path):
    out = run_python(
        "import importlib.util as u\n"
        "import shira_runtime, shira_runtime.kernels, shira_runtime.exporters\n"
        "for n in ('runtime', 'exporters', 'benchmarks', 'kernels'):\n"
        "    s = u.find_spec(n)\n"
        "    print(n, s.origin if s else None)\n",
        tmp_path,
    )
    found = dict(line.split(" ", 1) for line in out.splitlines())
    for name, origin in found.items():
        assert origin == "None" or str(ROOT) not in origin, f"`import {name}` finds our {origin}"


def test_hugging_face_kernels_is_not_shadowed_from_the_repository_root():
    """From the root, where ``python -m benchmarks...`` and pytest run, transformers' ``import kernels`` gets
    Hugging Face's package: our root ``kernels/`` folder holds C++ sources and has no ``__init__.py``."""
    if importlib.util.find_spec("kernels") is None or importlib.util.find_spec("transformers") is None:
        pytest.skip("Hugging Face's kernels or transformers is not installed (the test extra installs both)")
    out = run_python(
        "import importlib.metadata as md, kernels, transformers\n"
        "from transformers.utils import import_utils as iu\n"
        "from shira_runtime import Runtime\n"
        "from shira_runtime.kernels import backend\n"
        "print(kernels.__file__)\n"
        "print(md.distribution('kernels').locate_file('kernels/__init__.py'))\n"
        # any version: whether transformers finds the package at all (its own version range is its business)
        "print(iu.is_kernels_available(MIN_VERSION='0', MAX_VERSION='999999'))\n",
        ROOT,
    )
    origin, dist_file, available = out.split()
    assert str(ROOT) not in origin and Path(origin).name == "__init__.py", origin
    assert Path(origin).resolve() == Path(dist_file).resolve(), (origin, dist_file)
    assert available == "True"
    assert not (ROOT / "kernels" / "__init__.py").exists()


@pytest.mark.parametrize("script", ["shira-package", "shira-serve", "shira-convert"])
def test_console_scripts_answer_help(script):
    here = Path(sys.executable).parent / script  # this interpreter's own scripts first (a venv's)
    exe = str(here) if here.exists() else shutil.which(script)
    assert exe, f"{script} is not installed"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
