"""Packaging: one directory with the base (ONNX) and compact adapters; loads in a fresh process, no model code."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("onnxruntime")

from peft import LoraConfig, ShiraConfig, get_peft_model  # noqa: E402
from shira_runtime import AdapterFormatError, BaseMismatchError, Runtime  # noqa: E402
from shira_runtime.exporters.package import main as package_main  # noqa: E402
from shira_runtime.exporters.package import package  # noqa: E402
from shira_runtime.models import TARGETS, build  # noqa: E402
from shira_runtime.synthetic import random_shira  # noqa: E402

from tests.conftest import as_torch  # noqa: E402


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pkg")
    base = build("tiny", torch.float32, seed=0)
    torch.manual_seed(1)
    get_peft_model(
        copy.deepcopy(base), ShiraConfig(r=2, target_modules=list(TARGETS), init_weights=False, random_seed=1)
    ).save_pretrained(tmp / "peft_shira")
    pl = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    pl.save_pretrained(tmp / "peft_lora")
    random_shira(base, TARGETS, 0.02, seed=5).save(tmp / "ours.safetensors")
    adapters = {"s": tmp / "peft_shira", "l": tmp / "peft_lora", "o": tmp / "ours.safetensors"}
    out = package(base, tmp / "bundle", adapters, values="fp16", quiet=True)
    return base, adapters, out


def test_bundle_lists_adapters_and_is_compact(packaged):
    base, adapters, out = packaged
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["adapters"]) == {"s", "l", "o"}
    s = manifest["adapters"]["s"]
    # PEFT spends 12 bytes per nonzero; on this tiny model the header (checksums, probes) weighs too
    assert s["kind"] == "shira" and s["bytes"] < 12 * s["nonzeros"]
    assert manifest["adapters"]["l"]["kind"] == "lora"


def test_bundle_switches_like_the_torch_runtime(packaged):
    base, adapters, out = packaged
    rt = Runtime.load(out)
    assert set(rt.adapters) == {"s", "l", "o"}
    ref = Runtime.load(copy.deepcopy(base))
    for n, entry in json.loads((out / "manifest.json").read_text())["adapters"].items():
        ref.add_adapter(n, out / entry["path"])  # the same (fp16-rounded) deltas, applied by the torch backend
    x = torch.randint(0, 256, (2, 8))
    for state in (None, "s", "o", "l", ["s", "o"], None):
        rt.switch(state)
        ref.switch(state)
        np.testing.assert_allclose(rt(x), ref(x).numpy(), atol=1e-4, rtol=1e-4)


def test_fresh_process_without_model_code(packaged):
    _, _, out = packaged
    code = (
        "import sys, numpy as np\n"
        "from shira_runtime import Runtime\n"
        f"rt = Runtime.load({str(out)!r})\n"
        "x = np.arange(16, dtype=np.int64).reshape(2, 8)\n"
        "y0 = rt(x); rt.switch('s'); y1 = rt(x); rt.switch(None); y2 = rt(x)\n"
        "assert not np.allclose(y0, y1) and np.array_equal(y0, y2)\n"
        "print('ok', sorted(rt.adapters), 'shira_runtime.models' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["ok", "['l',", "'o',", "'s']", "False"]


def test_tampered_or_foreign_bundled_adapter_fails_its_switch_and_changes_nothing(packaged, tmp_path):
    import shutil

    _, _, out = packaged
    bundle = tmp_path / "b"
    shutil.copytree(out, bundle)
    f = bundle / "adapters" / "o.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x55
    f.write_bytes(bytes(data))
    other = build("tiny", torch.float32, seed=42)  # same shapes, other weights
    random_shira(other, TARGETS, 0.02, seed=5).save(bundle / "adapters" / "s.safetensors")
    rt = Runtime.load(bundle)
    before = {n: as_torch(t).clone() for n, t in rt.backend.tensors.items()}
    with pytest.raises(AdapterFormatError, match="o.safetensors.*corrupted"):
        rt.switch("o")
    with pytest.raises(BaseMismatchError):
        rt.switch("s")
    assert rt.active == ()
    for n, t in rt.backend.tensors.items():
        assert torch.equal(as_torch(t), before[n]), n


def test_cli_report(packaged, tmp_path, capsys):
    _, adapters, _ = packaged
    package_main(["--base", "tiny", "--adapter", f"s={adapters['s']}", "--out", str(tmp_path / "cli")])
    printed = capsys.readouterr().out
    assert "bytes/nonzero" in printed and "PEFT bytes" in printed and "decode ms" in printed
    row = next(line for line in printed.splitlines() if line.startswith("s "))
    assert row.split()[-1] != "-"  # the decode time was measured
    assert Runtime.load(tmp_path / "cli").adapters == ("s",)


def test_cli_quantize_int8(packaged, tmp_path, capsys):
    """--quantize int8: the base quantized before the export; adapters made on the float base are accepted (as
    the runtime accepts them), the bundle holds int8 codes and switches them."""
    _, adapters, _ = packaged
    out = tmp_path / "q"
    package_main(["--base", "tiny", "--adapter", f"o={adapters['o']}", "--out", str(out), "--quantize", "int8"])
    assert "an int8 base" in capsys.readouterr().out
    rt = Runtime.load(out)
    assert rt.adapters == ("o",) and rt.backend.scales
    assert all(rt.backend.tensors[n].dtype == np.uint8 for n in rt.backend.scales)  # the stored copies
    ids = torch.randint(0, 256, (1, 8)).numpy()
    y = rt(ids)
    rt.switch("o")
    assert not np.array_equal(rt(ids), y)
    rt.switch(None)
    assert np.array_equal(rt(ids), y)


def tiny_plain() -> torch.nn.Module:
    """A zero-argument callable for ``--base module.path:callable``."""
    return build("tiny", torch.float32, seed=0)


def test_cli_base_from_a_callable(packaged, tmp_path, capsys):
    _, adapters, _ = packaged
    package_main(
        [
            "--base",
            "tests.exporters.test_package:tiny_plain",
            "--example-shape",
            "1,8",
            "--adapter",
            f"o={adapters['o']}",
            "--out",
            str(tmp_path / "callable"),
        ]
    )
    rt = Runtime.load(tmp_path / "callable")
    rt.switch("o")  # the fingerprint was taken from this base: accepted
    assert rt.active == (("o", 1.0),)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda a: a.update({"": a.pop("s")}), "adapter '': the name must be a non-empty plain name"),
        (lambda a: a["s"].update(path="../manifest.json"), "is not inside adapters/"),
        (lambda a: a["o"].update(path="adapters/missing.safetensors"), "is missing"),
        (lambda a: a["l"].update(kind="dora"), "malformed entry"),
    ],
)
def test_bad_adapters_section_is_a_bundle_error(packaged, tmp_path, edit, message):
    """An empty adapter name in the manifest used to escape as a bare ValueError; every entry is checked when the
    manifest is read, even through a deliberately re-sealed manifest."""
    import shutil

    from shira_runtime.bundle import BundleError
    from shira_runtime.manifest import Manifest

    _, _, out = packaged
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    m = json.loads((bad / "manifest.json").read_text())
    edit(m["adapters"])
    (bad / "manifest.json").write_text(json.dumps(Manifest.seal(m)))
    with pytest.raises(BundleError, match=message):
        Runtime.load(bad)


def test_cli_quantize_int8_packs_a_peft_shira_dir_onto_the_torch_backends_codes(packaged, tmp_path):
    """`--quantize int8` with a PEFT SHiRA directory failed (its base shapes were unknown when the adapter was
    saved) after the export had written the bundle; and the default fp16 values moved some codes to the next
    grid point, away from the torch backend's. Now: packed with fp32 values, the same codes, the same tokens."""
    from shira_runtime import SparseAdapter, quantize

    from tests.exporters.test_quant_bundles import assert_same_codes

    _, adapters, _ = packaged
    out = tmp_path / "q"
    package_main(["--base", "tiny", "--adapter", f"s={adapters['s']}", "--out", str(out), "--quantize", "int8"])
    assert SparseAdapter.load(out / "adapters" / "s.safetensors").values
    stored = SparseAdapter.load(out / "adapters" / "s.safetensors")
    assert {v.dtype for v in stored.values.values()} == {torch.float32}
    rt = Runtime.load(out)
    tr = Runtime.load(quantize(build("tiny", torch.float32, seed=0), "int8"))
    tr.add_adapter("s", adapters["s"])  # the PEFT directory itself, on the int8 torch backend
    assert rt.adapters == ("s",)
    rt.switch("s"), tr.switch("s")
    assert_same_codes(rt, tr)  # the bundle's transposed uint8 copies hold the torch backend's codes
    ids = torch.randint(1, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    assert np.array_equal(np.asarray(rt.generate(ids.numpy(), max_new_tokens=8)), tr.generate(ids, max_new_tokens=8))


def test_lora_into_an_int8_bundle_is_refused_before_anything_is_written(packaged, tmp_path, capsys):
    """A PEFT LoRA was accepted into an int8 bundle, then every switch to it failed ("register it with
    mode='unfused'"), which a bundled adapter cannot do: refused at packaging, with the reason."""

    _, adapters, _ = packaged
    out = tmp_path / "q"
    argv = ["--base", "tiny", "--adapter", f"s={adapters['s']}", "--adapter", f"l={adapters['l']}"]
    err = cli_error([*argv, "--out", str(out), "--quantize", "int8"], capsys)
    assert re.search(r"ExportError: adapter 'l': a LoRA on int8 weights .*no unfused LoRA slots", err), err
    assert not out.exists() and list(tmp_path.iterdir()) == []


class Drifting(torch.nn.Module):
    """A module whose every call differs (a Python counter the trace freezes): onnxruntime's outputs differ from
    the module's first call, so the exporter's check refuses it after the weights and the graph are written."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.lin(x) * self.calls


def _fail_corrupt(packaged, tmp_path):
    _, adapters, _ = packaged
    bad = tmp_path / "corrupt.safetensors"
    data = bytearray(adapters["o"].read_bytes())
    data[-3] ^= 0x55
    bad.write_bytes(bytes(data))
    return build("tiny", torch.float32, seed=0), {"o": bad}, None, AdapterFormatError


def _fail_foreign(packaged, tmp_path):
    _, adapters, _ = packaged
    return build("tiny", torch.float32, seed=42), {"o": adapters["o"]}, None, BaseMismatchError


def _fail_export_check(packaged, tmp_path):
    from shira_runtime.exporters import ExportError

    return Drifting(), {}, (torch.randn(2, 8),), ExportError


@pytest.mark.parametrize("failure", [_fail_corrupt, _fail_foreign, _fail_export_check])
def test_a_failed_package_leaves_nothing_and_keeps_an_old_bundle(packaged, tmp_path, failure):
    """The packager wrote into --out as it went: a failure left a half-written bundle there (an empty adapters/
    that loaded with no adapters; hundreds of MB when the exporter's own check refused). Now it writes beside,
    renames at the end, and a failure leaves nothing; an old bundle at --out (--overwrite) stays as it was."""
    import shutil

    _, _, good = packaged
    base, adapters, example, error = failure(packaged, tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(error):
        package(base, work / "new", adapters, example, quiet=True)
    assert list(work.iterdir()) == []  # neither the bundle nor its hidden staging directory
    shutil.copytree(good, work / "old")
    before = {p.relative_to(work): p.read_bytes() for p in (work / "old").rglob("*") if p.is_file()}
    with pytest.raises(error):
        package(base, work / "old", adapters, example, quiet=True, overwrite=True)
    assert [p.name for p in work.iterdir()] == ["old"]
    assert {p.relative_to(work): p.read_bytes() for p in (work / "old").rglob("*") if p.is_file()} == before
    assert set(Runtime.load(work / "old").adapters) == {"s", "l", "o"}


def test_an_existing_out_is_refused_unless_overwrite(packaged, tmp_path, capsys):
    """A non-empty --out is refused before any work; --overwrite replaces a bundle once the new one is complete;
    a directory that holds no bundle is never replaced; an empty one is taken."""
    _, adapters, _ = packaged
    out = tmp_path / "b"
    (out / "adapters").mkdir(parents=True)
    assert "is not empty" in cli_error(["--base", "tiny", "--adapter", f"o={adapters['o']}", "--out", str(out)], capsys)
    argv = ["--base", "tiny", "--adapter", f"o={adapters['o']}", "--out", str(out), "--overwrite"]
    assert "FileExistsError" in (err := cli_error(argv, capsys)) and "holds no bundle" in err
    assert [p.name for p in out.iterdir()] == ["adapters"]
    (out / "adapters").rmdir()
    package_main(["--base", "tiny", "--adapter", f"o={adapters['o']}", "--out", str(out)])  # empty: taken
    assert Runtime.load(out).adapters == ("o",)
    package_main(["--base", "tiny", "--adapter", f"s={adapters['s']}", "--out", str(out), "--overwrite"])
    assert Runtime.load(out).adapters == ("s",)
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_progress_bars_name_the_phases_on_stderr(packaged, tmp_path, capsys):
    """Exports and packaging ran for minutes without a sign of life; now tqdm bars on stderr name each phase.
    Shown when stderr is a terminal or with progress=True, never with progress=False."""
    _, adapters, _ = packaged
    base = build("tiny", torch.float32, seed=0)
    package(base, tmp_path / "on", {"o": adapters["o"]}, quiet=True, progress=True)
    err = capsys.readouterr().err
    for phase in ("check adapters", "export: trace", "export: check", "weights.safetensors", "adapters", "publish"):
        assert phase in err, phase
    package(base, tmp_path / "off", {"o": adapters["o"]}, quiet=True, progress=False)
    assert "package" not in capsys.readouterr().err


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        package_main(["--help"])
    text = capsys.readouterr().out
    options = text.split("options:")[1].split("\n  -")[1:]
    for option in options:
        flag = option.split()[0]
        if flag in ("h,", "-base", "-out"):  # --help; the required ones
            continue
        assert "default" in " ".join(option.split()), flag
    assert "fp32 with --quantize int8" in " ".join(text.split())


def test_export_onnx_refused_by_its_check_leaves_no_manifest(tmp_path):
    """export_onnx into a directory of the caller's: a refused check removes the manifest it wrote (no manifest,
    no bundle), so Runtime.load cannot take the half-checked export for a bundle."""
    from shira_runtime.bundle import BundleError
    from shira_runtime.exporters import ExportError, export_onnx

    with pytest.raises(ExportError, match="differs from the module's"):
        export_onnx(Drifting(), (torch.randn(2, 8),), tmp_path / "b")
    assert not (tmp_path / "b" / "manifest.json").exists()
    with pytest.raises(BundleError):
        Runtime.load(tmp_path / "b")


def test_cli_errors_are_messages_not_tracebacks(tmp_path, capsys):
    """A bad --base or a refused --out ends the command with the project's error class and message, exit 1."""
    with pytest.raises(SystemExit) as exit_info:
        package_main(["--base", "nonsense", "--out", str(tmp_path / "b")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "error: BaseLoadError: base 'nonsense'" in err and "Traceback" not in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(SystemExit) as exit_info:
        package_main(["--base", "tiny", "--out", str(tmp_path / "full")])
    assert exit_info.value.code == 1 and "FileExistsError" in capsys.readouterr().err
    assert (tmp_path / "full" / "x").read_text() == "keep"


def cli_error(argv: list[str], capsys) -> str:
    """Run the packager's command line, which must fail with exit code 1; its stderr (the message, no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        package_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err, err
    return err
