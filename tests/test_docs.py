"""Every fenced code block of README.md and docs/**/*.md runs here, so no snippet drifts from the code.

The mode of a block is chosen by an HTML comment on the line just before its fence, ``<!-- doc-test: MODE -->``:

- ``run`` (the default for ```python, ```bash and ```console): the file's blocks run in document order in one
  fresh subprocess whose working directory is a temporary folder; python blocks share one namespace (as if
  concatenated), shell blocks run with ``bash -e`` there, with the repository root on ``PYTHONPATH`` (as from a
  checkout, where ``python -m benchmarks.X`` works).
- ``help``: each command (``&&`` and line separated; ``python -m MOD`` or a console script of pyproject) runs as
  ``PROGRAM [leading positional args] --help``; it must exit 0 and its help must list every ``--flag`` the
  command uses. Any other program in a help block fails the test.
- ``ci``: each command must be a command of ``.ci/run`` (after dropping ``--index-url URL``: the same install from
  another index), in the order ``.ci/run`` runs them; a ``python -m benchmarks.X`` command that CI does not run
  is checked as in ``help`` mode.
- ``text`` blocks (```text: formulas, outputs) are not code and are never run; a ``python``/``bash``/``console``
  block may not be marked ``text``.

Any other mode, or a fence without a language, fails the test.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
CODE_LANGS = {"python", "bash", "console"}
MODES = {"run", "help", "ci"}
MARK = re.compile(r"<!--\s*doc-test:\s*(\S+)\s*-->")
TEST_REF = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    mode: str
    code: str

    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().split("\n")
    found, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(.*)$", lines[i])
        if not fence:
            i += 1
            continue
        lang = fence.group(2).strip()
        mark = MARK.search(lines[i - 1]) if i > 0 else None
        mode = mark.group(1) if mark else ("text" if lang == "text" else "run")
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith("```"):
            j += 1
        if j == len(lines):
            raise AssertionError(f"{path}:{i + 1}: unclosed code fence")
        found.append(Block(path, i + 1, lang, mode, "\n".join(lines[i + 1 : j]) + "\n"))
        i = j + 1
    return found


ALL = [b for p in DOCS for b in blocks(p)]


def commands(code: str) -> list[str]:
    """Shell commands of a block: continuation lines joined, comments dropped, split at ``&&``."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.split("\n"):
        line = line.split(" #")[0].strip() if not line.lstrip().startswith("#") else ""
        out += [" ".join(c.split()) for c in line.split("&&") if c.strip()]
    return out


def console_scripts() -> dict[str, str]:
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.:]+)"', section, re.M))


def program(argv: list[str]) -> tuple[list[str], list[str]]:
    """(how to run the program, its arguments) for ``python -m MOD ...`` or a console script."""
    env = [a for a in argv if re.match(r"^[A-Z_]+=", a)]
    argv = argv[len(env) :]
    if argv[:2] == ["python", "-m"]:
        return [sys.executable, "-m", argv[2]], argv[3:]
    scripts = console_scripts()
    if argv and argv[0] in scripts:
        module, func = scripts[argv[0]].split(":")
        code = f"import sys; from {module} import {func}; sys.argv[0] = {argv[0]!r}; sys.exit({func}())"
        return [sys.executable, "-c", code], argv[1:]
    raise AssertionError(f"help mode knows `python -m MOD` and the console scripts, not {' '.join(argv)!r}")


def check_help(cmd: str, where: str) -> None:
    prog, args = program(shlex.split(cmd))
    lead = []
    for a in args:  # positional arguments before the first option (a subcommand such as `to-ours`)
        if a.startswith("-"):
            break
        lead.append(a)
    res = subprocess.run([*prog, *lead, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{where}: `{cmd}` --help failed:\n{res.stderr[-2000:]}"
    for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", cmd):
        assert flag in res.stdout, f"{where}: `{cmd}` uses {flag}, which its --help does not list"


def ci_lines() -> list[str]:
    """The commands .ci/run runs, in order (a line with ``&&`` gives several)."""
    return commands((ROOT / ".ci/run").read_text())


def without_index(cmd: str) -> str:
    return re.sub(r"\s+--(extra-)?index-url\s+\S+", "", cmd).strip()


# -- the rules themselves -------------------------------------------------------------------------------------


def test_every_block_has_a_known_mode():
    assert ALL, "no code blocks found"
    for b in ALL:
        assert b.lang, f"{b.where()}: a code fence needs a language (python, bash, console or text)"
        assert b.mode in MODES | {"text"}, f"{b.where()}: unknown doc-test mode {b.mode!r}"
        if b.lang in CODE_LANGS:
            assert b.mode in MODES, f"{b.where()}: a {b.lang} block cannot be marked {b.mode!r}"
        else:
            assert b.lang == "text" and b.mode == "text", f"{b.where()}: ```{b.lang} blocks are not tested"


def test_the_parser_reads_modes_and_commands(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("<!-- doc-test: help -->\n```bash\na --b \\\n  --c  # note\nd && e\n```\n```text\nf\n```\n")
    got = blocks(doc)
    assert [(b.lang, b.mode) for b in got] == [("bash", "help"), ("text", "text")]
    assert commands(got[0].code) == ["a --b --c", "d", "e"]
    assert without_index("pip install t==1 --index-url https://x/y") == "pip install t==1"


# -- ci: the README's set-up lines are what CI runs ------------------------------------------------------------


@pytest.mark.parametrize("block", [b for b in ALL if b.mode == "ci"], ids=Block.where)
def test_ci_blocks_match_ci_run(block):
    lines = ci_lines()
    for line in block.code.split("\n"):
        cmds = commands(line)
        at = -1
        for cmd in cmds:
            bare = without_index(cmd)
            if bare in lines:
                assert lines.index(bare) > at, f"{block.where()}: `{cmd}` runs earlier in .ci/run than here"
                at = lines.index(bare)
            elif re.match(r"^python -m benchmarks\.\w+", cmd):
                check_help(cmd, block.where())  # a benchmark CI does not run: it must exist with its flags
            else:
                raise AssertionError(f"{block.where()}: `{cmd}` is not a command of .ci/run")


def test_readme_has_both_ci_lines():
    readme = (ROOT / "README.md").read_text()
    setup = 'pip install torch==2.13.0 && pip install -e ".[torch,test]"'
    assert f"{setup} && python -m benchmarks.switch_latency\n" in readme
    assert (
        f"{setup} && python -m pytest && SHIRA_KERNELS=torch python -m pytest tests/kernels tests/runtime\n"
    ) in readme
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in readme


# -- help: long commands exist with the flags they use -----------------------------------------------------------


HELP = [(b, c) for b in ALL if b.mode == "help" for c in commands(b.code)]


@pytest.mark.parametrize(("block", "cmd"), HELP, ids=[f"{b.where()} {c[:60]}" for b, c in HELP])
def test_help_commands_exist_with_their_flags(block, cmd):
    check_help(cmd, block.where())


# -- run: every runnable block, per file, in order -----------------------------------------------------------------

DRIVER = r"""
import json, subprocess, sys
ns = {"__name__": "__main__"}
for where, lang, code in json.load(open(sys.argv[1])):
    print(f"--- {where} ({lang})", flush=True)
    if lang == "python":
        exec(compile(code, where, "exec"), ns)
    else:
        subprocess.run(["bash", "-e", "-c", code], check=True)
"""

RUN_FILES = sorted({b.path for b in ALL if b.mode == "run"})
SLOW_FILES = {"README.md", "docs/bundles.md", "docs/serving.md", "docs/quantized.md", "docs/masks-and-fusion.md"}


def run_params():
    for p in RUN_FILES:
        rel = str(p.relative_to(ROOT))
        yield pytest.param(p, id=rel, marks=[pytest.mark.slow] if rel in SLOW_FILES else [])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", list(run_params()))
def test_runnable_blocks(path, tmp_path):
    todo = [(b.where(), b.lang, b.code) for b in blocks(path) if b.mode == "run"]
    plan = tmp_path / "_blocks.json"
    plan.write_text(json.dumps(todo))
    (tmp_path / "_driver.py").write_text(DRIVER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])  # the installed console scripts
    res = subprocess.run(
        [sys.executable, str(tmp_path / "_driver.py"), str(plan)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=850,
    )
    assert res.returncode == 0, f"{path.relative_to(ROOT)}:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"


# -- guarantees name tests that exist ---------------------------------------------------------------------------


def test_named_tests_exist():
    refs = set(TEST_REF.findall((ROOT / "README.md").read_text()))
    assert len(refs) >= 8, "the README's guarantees name their tests"
    for path in DOCS[1:]:
        refs |= set(TEST_REF.findall(path.read_text()))
    for file, name in sorted(refs):
        tree = ast.parse((ROOT / file).read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}
        assert name in names, f"{file}::{name} is named in the docs but does not exist"
