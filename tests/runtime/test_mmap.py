"""Memory-mapped bundle weights (Linux): load maps the weight file copy-on-write and reads no weight page;
``switch(None)`` hands the pages a switch dirtied back (their bytes equal the file again); a corrupted byte is
refused before any output (``verify="load"``: at load); two processes share the clean pages. RSS and PSS are
measured in fresh subprocesses; the figures are printed (``pytest -s``), the bounds are loose, and no time is
asserted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from shira_runtime import Runtime, kernels, save_adapter
from shira_runtime.bundle import BundleError
from shira_runtime.exporters import export_onnx
from shira_runtime.exporters.onnx_export import write_safetensors
from shira_runtime.models import TARGETS, build
from shira_runtime.onnx_backend import SERIAL_MIN_RUN, OnnxBackend
from shira_runtime.synthetic import random_lora, random_shira

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RSS, PSS and smaps: Linux")
IDS = np.arange(1, 17, dtype=np.int64).reshape(1, 16)
MB = 1 << 20


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The 'small' preset (55.6 MB of fp32 weights) and a 1% SHiRA adapter file."""
    root = tmp_path_factory.mktemp("mmap")
    m = build("small", torch.float32, seed=0)
    export_onnx(m, (torch.zeros(1, 8, dtype=torch.long),), root / "bundle")
    save_adapter(random_shira(m, TARGETS, 0.01, seed=1, std=0.02), root / "a.safetensors")
    return root / "bundle", root / "a.safetensors"


# -- subprocess measurements --
PRELUDE = """
import json, os, sys
import numpy as np, onnx, onnxruntime as ort, psutil, torch
from onnx import TensorProto, helper
from shira_runtime import Runtime
proc = psutil.Process()
IDS = np.arange(1, 17, dtype=np.int64).reshape(1, 16)
def status():
    lines = [l.split(":") for l in open("/proc/self/status") if l.startswith("Rss")]
    return {k: int(v.split()[0]) * 1024 for k, v in lines}
def warm_ort():
    # onnxruntime's own code pages and allocators, touched once by a session of nothing: not the bundle's cost
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 4]) for n in "xw"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])])
    s = ort.InferenceSession(helper.make_model(g).SerializeToString(), providers=["CPUExecutionProvider"])
    s.run(None, {"x": np.ones((4, 4), np.float32), "w": np.ones((4, 4), np.float32)})
"""


def run_script(body: str, *args: str, env: dict | None = None) -> dict:
    code = PRELUDE + textwrap.dedent(body)
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300, env=env or _env()
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1")


def test_load_reads_no_weight_pages(small):
    bundle, _ = small
    got = run_script(
        """
        b = sys.argv[1]
        r0 = proc.memory_info().rss
        warm_ort()
        r1 = proc.memory_info().rss
        rt = Runtime.load(b)
        r2 = proc.memory_info().rss
        be = rt.backend
        zero_copy = all(be._values[n].data_ptr() == a.ctypes.data for n, a in be.arrays.items())
        print(json.dumps({"cold": r2 - r0, "warm": r2 - r1, "mapped": be.mapped, "zero_copy": zero_copy}))
        """,
        str(bundle),
    )
    weights = (bundle / "weights.safetensors").stat().st_size
    print(
        f"\nRSS added by Runtime.load of {weights / MB:.1f} MB of weights: {got['warm'] / MB:.1f} MB "
        f"({got['warm'] / weights:.1%}); {got['cold'] / MB:.1f} MB ({got['cold'] / weights:.1%}) counting "
        f"onnxruntime's first session"
    )
    assert got["mapped"] and got["zero_copy"]
    assert got["warm"] <= 0.25 * weights


def test_switch_none_returns_rss_to_baseline(small):
    bundle, adapter = small
    got = run_script(
        """
        b, a = sys.argv[1], sys.argv[2]
        rt = Runtime.load(b)
        rt.add_adapter("a", a)
        rt.switch("a")  # one cycle before: what the first switch loads for good is not measured
        rt(IDS)
        rt.switch(None)
        y0 = rt(IDS)
        r0, s0 = proc.memory_info().rss, status()
        rt.switch("a")
        ya = rt(IDS)
        r1, s1 = proc.memory_info().rss, status()
        rt.switch(None)
        y1 = rt(IDS)
        r2, s2 = proc.memory_info().rss, status()
        be, f = rt.backend, os.open(os.path.join(b, "weights.safetensors"), os.O_RDONLY)
        same = all(os.pread(f, n, at) == be.arrays[k].tobytes() for k, (at, n) in be._map.spans.items())
        print(json.dumps({"before": r0, "switched": r1, "after": r2, "anon": [s0["RssAnon"], s1["RssAnon"],
            s2["RssAnon"]], "file_bytes": same, "moved": not np.array_equal(y0, ya),
            "same": y0.tobytes() == y1.tobytes()}))
        """,
        str(bundle),
        str(adapter),
    )
    print(
        f"\nRSS before switch('a') {got['before'] / MB:.1f} MB, switched {got['switched'] / MB:.1f} MB, after "
        f"switch(None) {got['after'] / MB:.1f} MB ({(got['after'] - got['before']) / MB:+.2f} MB); anonymous "
        f"{[round(x / MB, 1) for x in got['anon']]} MB"
    )
    assert got["moved"] and got["same"] and got["file_bytes"]
    assert got["anon"][1] - got["anon"][0] > 4 * MB  # the switch made private copies of the pages it wrote
    assert abs(got["after"] - got["before"]) <= 4 * MB


PSS = """
b = sys.argv[1]
warm_ort()
print("ready", flush=True); sys.stdin.readline()  # every process has imported: shared libraries are shared
p0 = proc.memory_full_info().pss
rt = Runtime.load(b)
rt(IDS)
print("ready", flush=True); sys.stdin.readline()  # every process has loaded and run
print(json.dumps({"pss": proc.memory_full_info().pss - p0}), flush=True)
"""


def _pss_of(bundle, n: int) -> list[int]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PRELUDE + PSS, str(bundle)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for _ in range(n)
    ]
    try:
        for _ in range(2):  # two barriers
            for p in procs:
                assert p.stdout.readline().strip() == "ready"
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
        return [json.loads(p.stdout.readline())["pss"] for p in procs]
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(timeout=60)


def test_two_processes_share_the_weight_pages(small):
    bundle, _ = small
    one = _pss_of(bundle, 1)[0]
    two = sum(_pss_of(bundle, 2))
    print(f"\nPSS added by a loaded bundle: one process {one / MB:.1f} MB, two {two / MB:.1f} MB ({two / one:.2f}x)")
    assert two < 1.5 * one


# -- in process --
def test_flipped_weight_byte_is_refused_before_any_output(small, tmp_path):
    """By default the weight file's sha256 runs on a background thread: the load returns, and the first
    inference (and every later one, and a fingerprint check that failed against the corrupted base) raises the
    mismatch instead of returning outputs. ``verify="load"`` refuses at load."""
    bundle, adapter = small
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    path = bad / "weights.safetensors"
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))
    refused = r"weights\.safetensors: sha256 differs"
    with pytest.raises(BundleError, match=refused):
        OnnxBackend.open(bad, verify="load")
    rt = Runtime.load(bad)
    for _ in range(2):
        with pytest.raises(BundleError, match=refused):
            rt(IDS)
    with pytest.raises(BundleError, match=refused):
        rt.backend.verified()
    rt.add_adapter("a", adapter)  # a switch is no output: it works, and its revert is exact
    before = {n: a.copy() for n, a in rt.backend.arrays.items()}
    rt.switch("a")
    with pytest.raises(BundleError, match=refused):
        rt(IDS)
    rt.switch(None)
    assert all(np.array_equal(before[n].view(np.uint8), a.view(np.uint8)) for n, a in rt.backend.arrays.items())
    # the same bundle, intact: outputs come back once the check is done
    good = Runtime.load(bundle)
    assert np.isfinite(good(IDS)).all()
    good.backend.verified()
    with pytest.raises(ValueError, match="verify must be"):
        OnnxBackend.open(bundle, verify="later")


def private_dirty(backend: OnnxBackend) -> int:
    """Bytes of the weight map that this process holds as private copies (smaps of that mapping)."""
    return smaps_bytes(backend, "Private_Dirty")


def smaps_bytes(backend: OnnxBackend, field: str) -> int:
    """Field ``field`` (a size in kB) of the weight map's entry in ``/proc/self/smaps``, in bytes."""
    start = backend._map_start  # the map's first byte
    lines = open("/proc/self/smaps").read().splitlines()
    for i, line in enumerate(lines):
        if line.split("-")[0] == f"{start:x}":
            for entry in lines[i + 1 :]:
                if entry.startswith(field + ":"):
                    return int(entry.split()[1]) * 1024
    raise AssertionError("the weight map is not in /proc/self/smaps")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    m = build("tiny", torch.float32, seed=5)
    path = export_onnx(
        m,
        (torch.zeros(1, 8, dtype=torch.long),),
        tmp_path_factory.mktemp("tiny") / "b",
        lora_rank=8,
        lora_targets=TARGETS,
    )
    return m, path


@pytest.mark.parametrize("kind", ["shira", "lora fused", "lora unfused", "shira and lora fused"])
def test_base_pages_are_handed_back_bit_exact(tiny, kind):
    """After ``switch(None)`` the map holds no private page, its bytes equal the file, outputs are bit-identical;
    a failed switch also leaves nothing private."""
    m, path = tiny
    rt = Runtime.load(path)
    be = rt.backend
    assert be.mapped
    y0 = rt(IDS)
    assert private_dirty(be) == 0  # the probe's pages went back too
    rt.add_adapter("s", random_shira(m, TARGETS, 0.05, seed=1, std=0.05))
    rt.add_adapter("l", random_lora(m, TARGETS, 4, seed=2, std=0.05))
    rt.add_adapter("u", random_lora(m, TARGETS, 4, seed=3, std=0.05), mode="unfused")
    names = {"shira": "s", "lora fused": "l", "lora unfused": "u", "shira and lora fused": ["s", "l"]}[kind]
    rt.switch(names)
    assert private_dirty(be) > 0
    assert not np.array_equal(rt(IDS), y0)
    rt.switch(None)
    assert private_dirty(be) == 0
    with open(path / "weights.safetensors", "rb") as f:
        for name, (at, n) in be._map.spans.items():
            assert os.pread(f.fileno(), n, at) == be.arrays[name].tobytes(), name
    assert rt(IDS).tobytes() == y0.tobytes()


def test_writer_aligns_tensors_and_old_layouts_still_load(tiny, tmp_path):
    """New files: the data starts on a 64-byte boundary and every tensor of a 64-byte multiple starts on one.
    A file whose tensors are not item-aligned (written by hand) is read into private memory, with one warning."""
    _, path = tiny
    be = OnnxBackend.open(path)
    assert all(at % 64 == 0 for name, (at, n) in be._map.spans.items() if n % 64 == 0)
    arrays = {"a": np.arange(3, dtype=np.float32), "b": np.arange(5, dtype=np.int8), "c": np.ones(16, np.float32)}
    write_safetensors(tmp_path / "w.safetensors", arrays, {})
    raw = (tmp_path / "w.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    assert (8 + n) % 64 == 0 and header["c"]["data_offsets"][0] == 0
    assert [k for k in header if k != "__metadata__"] == ["c", "a", "b"]

    old = tmp_path / "old"
    shutil.copytree(path, old)
    _shift_data(old)
    with pytest.warns(UserWarning, match="not aligned to its item size") as caught:
        rt = Runtime.load(old)
    assert len([w for w in caught if "aligned" in str(w.message)]) == 1
    assert not rt.backend.mapped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rt(IDS).tobytes() == Runtime.load(path)(IDS).tobytes()


def _shift_data(bundle) -> None:
    """Rewrite the weight file with its header one byte longer (every tensor then starts at an odd byte) and
    re-seal the manifest with the new checksum."""
    from shira_runtime.bundle import file_sha256
    from shira_runtime.manifest import Manifest

    path = bundle / "weights.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n].rstrip(b" ")
    pad = b" " * ((-(8 + len(header)) % 8) + 1)  # item-aligned for none of fp32's 4 bytes
    path.write_bytes((len(header) + len(pad)).to_bytes(8, "little") + header + pad + raw[8 + n :])
    manifest = Manifest.read(bundle)
    manifest.weights_sha256 = file_sha256(path)
    manifest.write(bundle)


@pytest.fixture(scope="module")
def small_int8(tmp_path_factory):
    """The 'small' preset quantized to int8 (its linears), exported: the bundle stores each int8 weight as the
    transposed uint8 copy its graph reads; and a 1% SHiRA adapter made on the float model."""
    import shira_runtime.exporters.onnx_export as onnx_export
    from shira_runtime import quantize
    from shira_runtime.exporters.quant_graph import rewrite_int8

    root = tmp_path_factory.mktemp("mmap8")
    m = build("small", torch.float32, seed=0)
    save_adapter(random_shira(m, TARGETS, 0.01, seed=1, std=0.02), root / "a.safetensors")
    q = quantize(m, "int8")
    export_onnx(q, (torch.zeros(1, 8, dtype=torch.long),), root / "bundle")
    with pytest.MonkeyPatch.context() as mp:  # the form before: codes in the file, the copies built at load
        mp.setattr(onnx_export, "rewrite_int8", lambda g, quant: rewrite_int8(g, quant, form="u8t16"))
        export_onnx(q, (torch.zeros(1, 8, dtype=torch.long),), root / "u8t")
    return root / "bundle", root / "a.safetensors"


def test_an_int8_bundle_is_mapped_like_any_other(small_int8):
    """An int8 bundle's weights are views of the map too (the copies the graph reads are stored, not built): load
    adds little RSS, a switch dirties only the pages it writes, and ``switch(None)`` hands them all back with the
    file's bytes and the base's outputs."""
    bundle, adapter = small_int8
    script = """
        b = sys.argv[1]
        warm_ort()
        r1 = proc.memory_info().rss
        rt = Runtime.load(b)
        r2 = proc.memory_info().rss
        be = rt.backend
        copies = [n for n, t in be.tensors.items() if t.dtype == np.uint8]
        in_map = all(np.shares_memory(be.tensors[n], np.frombuffer(be._map.mm, np.uint8)) for n in copies)
        print(json.dumps({"warm": r2 - r1, "mapped": be.mapped, "copies": len(copies), "in_map": in_map}))
        """
    got, old = run_script(script, str(bundle)), run_script(script, str(bundle.parent / "u8t"))
    weights = (bundle / "weights.safetensors").stat().st_size
    print(
        f"\nRSS added by Runtime.load of an int8 bundle ({weights / MB:.1f} MB): {got['warm'] / MB:.1f} MB; of the "
        f"same base in the form that builds the copies at load: {old['warm'] / MB:.1f} MB"
    )
    assert not old["in_map"] and old["copies"] == got["copies"]
    assert got["mapped"] and got["copies"] > 0 and got["in_map"]
    # ~5 MB of it is onnxruntime's session, whatever the bundle (an fp32 bundle of 53 MB adds 5.1 MB); the form
    # that built the copies at load added 17.8 MB for these 19.3 MB
    assert got["warm"] <= 0.5 * weights
    rt = Runtime.load(bundle)
    be = rt.backend
    y0 = rt(IDS)
    assert private_dirty(be) == 0
    rt.add_adapter("a", adapter)
    rt.switch("a")
    assert 0 < private_dirty(be) and not np.array_equal(rt(IDS), y0)
    rt.switch(None)
    assert private_dirty(be) == 0
    with open(bundle / "weights.safetensors", "rb") as f:
        for name, (at, n) in be._map.spans.items():
            assert os.pread(f.fileno(), n, at) == be.arrays[name].tobytes(), name
    assert rt(IDS).tobytes() == y0.tobytes()


# -- pages made private before a switch writes them (OnnxBackend.before_write) --
def anonymous(backend: OnnxBackend) -> int:
    """Bytes of the weight map held as anonymous (private) pages."""
    return smaps_bytes(backend, "Anonymous")


def adapter_pages(rt: Runtime, name: str) -> set[int]:
    """The pages of the map that adapter ``name``'s entries land on, from its storage indices and each weight's
    address (not through the backend's own page arithmetic)."""
    be, page = rt.backend, os.sysconf("SC_PAGE_SIZE")
    out = set()
    for t, (idx, _) in rt._get(name).sparse.items():
        w = be.tensors[t]
        at = w.ctypes.data - be._map_start + np.asarray(idx, np.int64) * w.itemsize
        out.update((at // page).tolist())
    return out


def in_runs(pages: set[int], least: int) -> set[int]:
    """The pages of ``pages`` in runs of ``least`` consecutive pages or more."""
    out, run = set(), []
    for p in sorted(pages):
        if run and p != run[-1] + 1:
            out.update(run if len(run) >= least else ())
            run = []
        run.append(p)
    return out | (set(run) if len(run) >= least else set())


@pytest.fixture
def core_threads(request):
    """The core's ``serial_below`` knob set for the test (0: every call threaded; huge: none), then restored."""
    from shira_runtime.kernels import core

    if kernels.backend() != "cpp" or core.threads() < 2:
        pytest.skip("the core's threads: the C++ kernels on two CPUs or more")
    old = core.tuning()["serial_below"]
    core.tuning(serial_below=0 if request.param else 1 << 62)
    yield request.param
    core.tuning(serial_below=old)


@pytest.mark.parametrize("core_threads", [True, False], indirect=True, ids=["threaded", "serial"])
@pytest.mark.parametrize("mask", [None, "block"])
def test_a_switch_from_the_base_makes_its_pages_private_before_writing(tiny, monkeypatch, mask, core_threads):
    """A switch from the base (the pages handed back) makes exactly the pages its entries land on private before
    the kernels write (one advice per run of pages, not one fault per page taken by two threads at once; on one
    thread its runs of ``SERIAL_MIN_RUN`` pages or more); weights and outputs are bit for bit those of a switch
    that lets the writes fault the pages in, and ``switch(None)`` hands every page back."""
    m, path = tiny
    rt = Runtime.load(path)
    be = rt.backend
    y0 = rt(IDS)
    # 0.5% in blocks: some pages of each weight, not all (the bitmap must skip what it need not advise)
    rt.add_adapter("a", random_shira(m, TARGETS, 0.005 if mask else 0.05, seed=1, std=0.05, mask=mask))
    touched = adapter_pages(rt, "a")
    want = touched if core_threads else in_runs(touched, SERIAL_MIN_RUN)
    pages = -(-len(be._map.mm) // os.sysconf("SC_PAGE_SIZE"))
    assert 0 < len(touched) < pages
    if core_threads or mask is None:  # random entries at 5%: every page of the weights, one run each
        assert len(want) > 0
    else:  # blocks on one thread: short runs, left to the kernel's faults
        assert len(want) < len(touched)
    seen = []
    real = kernels.switch_

    def spy(*args, **kwargs):
        seen.append(anonymous(be))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "switch_", spy)
    outputs, weights = [], []
    for populate in (True, False, True):
        be._populate = populate
        assert anonymous(be) == 0
        rt.switch("a")
        outputs.append(rt(IDS).tobytes())
        weights.append({n: a.tobytes() for n, a in be.arrays.items()})
        rt.switch(None)
        assert anonymous(be) == 0 and rt(IDS).tobytes() == y0.tobytes()
    page = os.sysconf("SC_PAGE_SIZE")
    into_a = seen[::2]  # each switch("a") (the switch(None) after it calls the kernels too)
    assert into_a[0] == into_a[2] == len(want) * page  # made private before the kernel call
    assert into_a[1] == 0  # without: the kernel's writes fault them in
    assert outputs[0] == outputs[1] == outputs[2] and outputs[0] != y0.tobytes()
    assert weights[0] == weights[1] == weights[2]
    assert not be._private.any()  # the release forgot them


@pytest.mark.parametrize("refusal", ["EINVAL", "ENOMEM"])
def test_a_kernel_that_refuses_the_advice_leaves_the_writes_to_fault(tiny, refusal):
    """Where the kernel does not know ``MADV_POPULATE_WRITE`` (before Linux 5.14: EINVAL), the first switch stops
    asking and writes as before; the result is the same bytes. A transient refusal (ENOMEM) is asked again at the
    next switch from the base."""
    import dataclasses
    import errno

    code = getattr(errno, refusal)
    m, path = tiny
    ref, rt = Runtime.load(path), Runtime.load(path)
    for r in (ref, rt):
        r.add_adapter("a", random_shira(m, TARGETS, 0.05, seed=1, std=0.05))
    asked = []

    class OldKernel:
        def __init__(self, mm):
            self.mm = mm

        def __len__(self):
            return len(self.mm)

        def madvise(self, option, *args):
            asked.append(option)
            if option == 23:
                raise OSError(code, os.strerror(code))
            return self.mm.madvise(option, *args)

    be = rt.backend
    be._map = dataclasses.replace(be._map, mm=OldKernel(be._map.mm))
    ref.switch("a")
    rt.switch("a")
    assert asked == [23] and be._populate == (refusal == "ENOMEM") and not be._private.any()
    assert all(be.arrays[n].tobytes() == a.tobytes() for n, a in ref.backend.arrays.items())
    rt.switch(None)
    assert anonymous(be) == 0
    rt.switch("a")  # asked again only after a transient refusal
    assert asked.count(23) == (2 if refusal == "ENOMEM" else 1)
    assert all(be.arrays[n].tobytes() == a.tobytes() for n, a in ref.backend.arrays.items())


def test_a_switch_that_fails_after_the_advice_hands_the_pages_back(tiny, monkeypatch):
    """A switch from the base that fails once its pages were made private (the kernel call raising here) leaves
    the weights as they were, bit for bit, and no private page: they go back with the rollback's release."""
    m, path = tiny
    rt = Runtime.load(path)
    be = rt.backend
    y0 = rt(IDS)
    rt.add_adapter("a", random_shira(m, TARGETS, 0.05, seed=1, std=0.05))
    before = {n: a.tobytes() for n, a in be.arrays.items()}
    made = []

    def broken(*args, **kwargs):
        made.append(anonymous(be))
        raise RuntimeError("injected before any write")

    monkeypatch.setattr(kernels, "switch_", broken)
    with pytest.raises(RuntimeError, match="injected"):
        rt.switch("a")
    assert made[0] > 0  # the pages had been made private
    assert anonymous(be) == 0 and not rt.active
    assert {n: a.tobytes() for n, a in be.arrays.items()} == before
    assert rt(IDS).tobytes() == y0.tobytes()
    monkeypatch.undo()
    rt.switch("a")  # the plan's pages are advised again (the release started a new generation)
    assert anonymous(be) > 0
