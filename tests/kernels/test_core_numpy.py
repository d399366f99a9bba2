"""The kernel core on numpy arrays (ctypes) against the numpy reference and the torch reference, byte for byte;
``opcheck`` on every torch op; a C program switching through the header and the built library.

Core cases skip (not fail) when the core cannot be built here; the C program skips without ``cc``.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import torch
from shira_runtime import kernels
from shira_runtime.kernels import KernelInputError, reference, reference_np

try:
    import ml_dtypes
except ImportError:  # bf16 / fp8 numpy arrays need it
    ml_dtypes = None


@pytest.fixture(scope="module")
def core():
    from shira_runtime.kernels import core

    try:
        core.load()
    except Exception as exc:
        pytest.skip(f"kernel core unavailable: {exc}")
    return core


@pytest.fixture
def np_knobs(core, monkeypatch):
    defaults = {k: v for k, v in core.tuning().items() if not k.startswith("last_")}

    def set_(threaded: bool, **kw):
        monkeypatch.setenv("SHIRA_THREADS", "2" if threaded else "1")
        core.tuning(serial_below=0 if threaded else 1 << 62, **kw)

    yield set_
    core.tuning(**defaults)


# ---- inputs: numpy arrays, and torch views of the same bytes ---------------------------------------------

NP_DTYPES = ["float32", "float16", "int8"] + (["bfloat16", "float8_e4m3fn", "float8_e5m2"] if ml_dtypes else [])
TORCH_OF = {"float32": torch.float32, "float16": torch.float16, "int8": torch.int8, "bfloat16": torch.bfloat16,
            "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}  # fmt: skip
CODES = ("int8", "float8_e4m3fn", "float8_e5m2")


def np_dtype(name: str):
    return (
        np.dtype(getattr(ml_dtypes, name)) if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2") else np.dtype(name)
    )


def to_torch(a: np.ndarray) -> torch.Tensor:
    """A torch view of the same memory (ml_dtypes arrays through their bits)."""
    name = a.dtype.name
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        bits = np.uint16 if name == "bfloat16" else np.uint8
        return torch.from_numpy(a.view(bits)).view(TORCH_OF[name])
    return torch.from_numpy(a)


def codes_of(name: str, rng, n: int) -> np.ndarray:
    """Random finite codes of a 1-byte format (NaN bit patterns excluded)."""
    if name == "int8":
        return rng.integers(-127, 128, n).astype(np.int8)
    raw = rng.integers(0, 256, n).astype(np.uint8)
    nan = (raw & 0x7F) == 0x7F if name == "float8_e4m3fn" else (raw & 0x7C) == 0x7C
    raw[nan] = 0x38
    return raw.view(np_dtype(name))


def state(name: str, idx_dtype, seed: int, shapes=((5, 40), (1, 1), (17, 13)), density=0.3, sort=True, baked=False):
    rng = np.random.default_rng(seed)
    dt = np_dtype(name)
    ws, idx, ds, saved, scales = [], [], [], [], []
    for k, shape in enumerate(shapes):
        numel = int(np.prod(shape))
        if name in CODES:
            w = codes_of(name, rng, numel).reshape(shape)
            scales.append((rng.random(shape[0]) * 0.1 + 1e-3).astype(np.float32))
        else:
            w = (rng.standard_normal(numel) * 10 ** rng.uniform(-3, 3, numel)).astype(np.float32).astype(dt)
            w = w.reshape(shape)
            scales.append(np.empty(0, np.float32))
        n = max(1, round(density * numel)) if k != 1 else 1
        i = rng.permutation(numel)[:n]
        i = (np.sort(i) if sort else i).astype(idx_dtype)
        if baked:
            d = codes_of(name, rng, n)
        elif name in CODES:
            d = (rng.standard_normal(n) * scales[-1][i // shape[1]] * 3).astype(np.float32)
            d[::7] *= 1000  # some clamp
        else:
            d = (rng.standard_normal(n) * 10 ** rng.uniform(-8, 4, n)).astype(np.float32)
        ws.append(w)
        idx.append(i)
        ds.append(d)
        saved.append(np.zeros(n, dt))
    return ws, idx, ds, saved, (scales if name in CODES and not baked else None)


def copy(arrays):
    return [a.copy() for a in arrays]


def same_bytes(got, want, what):
    for t, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        assert a.tobytes() == b.tobytes(), f"{what} {t} differs"


def run_switch(impl, ws, a_idx, a_d, a_saved, b_idx, b_d, b_saved, scales, mirrors=None):
    """Apply A, then switch A -> B (same weights), both with saturated counts; returns the counts."""
    n = len(ws)
    sat = np.zeros(n, np.int64) if scales is not None else None
    impl.apply_(ws, a_idx, a_d, a_saved, True, scales, sat, mirrors)
    impl.switch_(ws, a_idx, a_saved, ws, b_idx, b_d, b_saved, True, scales, sat, mirrors, mirrors)
    return sat


class TorchRef:
    """The torch reference on torch views of the numpy arrays."""

    @staticmethod
    def _t(x):
        if x is None:
            return None
        return [to_torch(a) for a in x] if isinstance(x, list) else to_torch(x)

    def apply_(self, *args):
        reference.apply_(*map(self._t, args[:4]), args[4], *map(self._t, args[5:]))

    def switch_(self, *args):
        reference.switch_(*map(self._t, args[:7]), args[7], *map(self._t, args[8:]))

    def restore_(self, *args):
        reference.restore_(*map(self._t, args[:3]), args[3], *map(self._t, args[4:]))


# ---- parity ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NP_DTYPES)
@pytest.mark.parametrize("idx_dtype", [np.int32, np.int64], ids=["i32", "i64"])
@pytest.mark.parametrize("threaded", [False, True], ids=["serial", "threaded"])
@pytest.mark.parametrize("plan", ["fused", "phased", "ordered"])
def test_core_equals_both_references(core, np_knobs, name, idx_dtype, threaded, plan):
    np_knobs(threaded, chunk=17, force_plan={"fused": 0, "phased": 1, "ordered": 2}[plan])
    ws, a_idx, a_d, a_saved, scales = state(name, idx_dtype, seed=1)
    _, b_idx, b_d, b_saved, _ = state(name, idx_dtype, seed=2, sort=plan != "phased")
    impls = [core, TorchRef()] + ([reference_np] if name in ("float32", "float16", "int8") else [])
    results = []
    for impl in impls:
        w, sa, sb = copy(ws), copy(a_saved), copy(b_saved)
        sat = run_switch(impl, w, a_idx, a_d, sa, b_idx, b_d, sb, scales)
        results.append((w, sa, sb, sat))
    if threaded:
        assert core.tuning()["last_plan"]["threaded"]
    for got in results[1:]:
        for k, what in enumerate(("weight", "saved A", "saved B")):
            same_bytes(results[0][k], got[k], what)
        if scales is not None:
            assert results[0][3].tolist() == got[3].tolist()
            assert results[0][3].sum() > 0 or name == "float8_e5m2"  # the clamp was exercised (e5m2 reaches 57344)


@pytest.mark.parametrize("name", CODES if ml_dtypes else ("int8",))
def test_baked_codes_and_mirrors(core, np_knobs, name):
    np_knobs(True, chunk=13)
    ws, a_idx, a_d, a_saved, _ = state(name, np.int64, seed=3, baked=True)
    impls = [core, TorchRef()] + ([reference_np] if name == "int8" else [])
    outs = []
    for impl in impls:
        w, s = copy(ws), copy(a_saved)
        if name == "int8":  # the transposed uint8 mirror of each 2-D weight
            ms = [np.ascontiguousarray((x.view(np.uint8) ^ 0x80).T) for x in w]
        else:
            ms = [x.astype(np.float32).astype(ml_dtypes.bfloat16) for x in w] if impl is not reference_np else None
        impl.apply_(w, a_idx, a_d, s, True, None, None, ms)
        outs.append((w, s, ms))
        if name == "int8":
            for x, m in zip(w, ms):
                assert m.tobytes() == np.ascontiguousarray((x.view(np.uint8) ^ 0x80).T).tobytes()
        else:
            for x, m in zip(w, ms):
                assert m.tobytes() == x.astype(np.float32).astype(ml_dtypes.bfloat16).tobytes()
        impl.restore_(w, a_idx, s, True, ms)
        same_bytes(w, ws, "restored weight")
    for got in outs[1:]:
        same_bytes(outs[0][1], got[1], "saved")


@pytest.mark.parametrize("impl_name", ["core", "reference_np"])
def test_empty_and_single(request, impl_name):
    impl = request.getfixturevalue("core") if impl_name == "core" else reference_np
    impl.apply_([], [], [], [])
    impl.switch_([], [], [], [], [], [], [])
    w, s = np.arange(4, dtype=np.float32), np.zeros(0, np.float32)
    impl.apply_([w], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)], [s])
    s = np.zeros(1, np.float32)
    impl.apply_([w], [np.array([2], np.int32)], [np.array([0.5], np.float32)], [s])
    assert w.tolist() == [0, 1, 2.5, 3] and s.tolist() == [2.0]
    impl.restore_([w], [np.array([2], np.int32)], [s])
    assert w.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("impl_name", ["core", "reference_np"])
@pytest.mark.parametrize("verb", ["apply_", "restore_", "switch_"])
@pytest.mark.parametrize("bad", [-1, 1000, 2**40], ids=["neg", "numel", "huge"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_out_of_range_refused_before_any_write(request, impl_name, verb, bad, where):
    impl = request.getfixturevalue("core") if impl_name == "core" else reference_np
    ws, idx, ds, saved, _ = state("float32", np.int64, seed=4, shapes=((50,), (10, 100), (30,)))
    idx[1][{"first": 0, "middle": idx[1].size // 2, "last": -1}[where]] = bad
    before_w, before_s = copy(ws), copy(saved)
    calls = {
        "apply_": lambda v: impl.apply_(ws, idx, ds, saved, v),
        "restore_": lambda v: impl.restore_(ws, idx, saved, v),
        "switch_": lambda v: impl.switch_(ws, idx, saved, ws, idx, ds, saved, v),
    }
    with pytest.raises(KernelInputError, match=rf"^shira::{verb}: (outgoing )?tensor 1: index {bad} out of range"):
        calls[verb](True)
    same_bytes(ws, before_w, "weight")
    same_bytes(saved, before_s, "saved")
    if where != "middle":
        with pytest.raises(KernelInputError, match=rf"index {bad} out of range"):
            calls[verb](False)
        same_bytes(ws, before_w, "weight")


@pytest.mark.parametrize("impl_name", ["core", "reference_np"])
@pytest.mark.parametrize(
    "kind, message",
    [
        ("weight-dtype", r"tensor 1: weight dtype float64 is not one of"),
        ("index-dtype", r"tensor 1: indices dtype int16 is not int32/int64"),
        ("saved-dtype", r"tensor 1: saved dtype float16 differs from weight dtype float32"),
        ("delta-shape", r"tensor 1: delta shape \[\d+\] does not match indices shape"),
        ("no-scales", r"tensor 1: a int8 weight needs its per-row scales"),
        ("overlap", r"tensor 1: the mirror overlaps its weight"),
        ("saturated", r"saturated must be int64 \[2\], got int32\[2\]"),
    ],
)
def test_malformed_refused(request, impl_name, kind, message):
    impl = request.getfixturevalue("core") if impl_name == "core" else reference_np
    buf = np.zeros(200, np.uint8)
    ws = [np.arange(30, dtype=np.float32), np.arange(20, dtype=np.float32)]
    idx = [np.array([1, 2]), np.array([3, 19])]
    ds, saved = [np.ones(2, np.float32), np.ones(2, np.float32)], [np.zeros(2, np.float32), np.zeros(2, np.float32)]
    scales, sat, ms = None, None, None
    if kind == "weight-dtype":
        ws[1] = ws[1].astype(np.float64)
    elif kind == "index-dtype":
        idx[1] = idx[1].astype(np.int16)
    elif kind == "saved-dtype":
        saved[1] = saved[1].astype(np.float16)
    elif kind == "delta-shape":
        ds[1] = ds[1][:1]
    elif kind in ("no-scales", "overlap"):
        ws[1] = buf[:40].view(np.int8).reshape(4, 10)
        saved[1] = np.zeros(2, np.int8)
        if kind == "overlap":
            scales = [np.empty(0, np.float32), np.ones(4, np.float32)]
            ms = [np.empty(0, np.uint8), buf[20:60].reshape(10, 4)]
    elif kind == "saturated":
        sat = np.zeros(2, np.int32)
    before = copy(ws)
    with pytest.raises(KernelInputError, match=rf"^shira::apply_: .*{message}"):
        impl.apply_(ws, idx, ds, saved, True, scales, sat, ms)
    same_bytes(ws, before, "weight")


def test_kernels_route_numpy_arrays(core):
    """``shira_runtime.kernels`` sends numpy arrays to the core (or the numpy reference) and tensors to torch."""
    w, s = np.zeros(5, np.float32), np.zeros(2, np.float32)
    kernels.apply_([w], [np.array([1, 3])], [np.ones(2, np.float32)], [s])
    assert w.tolist() == [0, 1, 0, 1, 0]
    kernels.restore_([w], [np.array([1, 3])], [s])
    assert not w.any()


# ---- the torch ops ---------------------------------------------------------------------------------------


def _op_args(verb: str):
    w, m = torch.zeros(2, 5, dtype=torch.int8), torch.zeros(10, dtype=torch.bfloat16)
    idx, s, d, sc = torch.tensor([1, 2]), torch.zeros(2, dtype=torch.int8), torch.ones(2), torch.ones(2)
    f, fi, fs = torch.randn(10), torch.tensor([0, 7], dtype=torch.int32), torch.empty(2)
    sat = torch.zeros(2, dtype=torch.int64)
    if verb == "restore_":
        return ([w, f], [idx, fi], [s, torch.ones(2)], True, [m, torch.empty(0)])
    if verb == "apply_":
        return ([w, f], [idx, fi], [d, torch.ones(2)], [s, fs], True, [sc, torch.empty(0)], sat, [m, torch.empty(0)])
    return ([w], [idx], [s], [w, f], [idx, fi], [d, torch.ones(2)], [s.clone(), fs], True, [sc, torch.empty(0)], sat,
            [m], [m, torch.empty(0)])  # fmt: skip


@pytest.mark.parametrize("verb", ["restore_", "apply_", "switch_"])
def test_opcheck_every_op(verb):
    from shira_runtime.kernels import extension

    try:
        extension.load()
    except Exception as exc:
        pytest.skip(f"kernel core unavailable: {exc}")
    torch.library.opcheck(getattr(torch.ops.shira, verb).default, _op_args(verb))


# ---- a C program -----------------------------------------------------------------------------------------

R, C, K = 33, 64, 33 * 64 // 7 - 1


def _c_inputs():
    n = R * C
    i = np.arange(n)
    w = ((i * 37) % 101).astype(np.float32) / np.float32(8) - np.float32(6)
    q = ((i * 31) % 255 - 127).astype(np.int8)
    scales = np.float32(0.01) * np.arange(1, R + 1).astype(np.float32)
    mirror = np.ascontiguousarray((q.reshape(R, C).view(np.uint8) ^ 0x80).T)
    k = np.arange(K)
    idx = (3 + 7 * k).astype(np.int32)
    delta = (k % 13).astype(np.float32) / np.float32(16) - np.float32(0.4)
    qdelta = (k % 17).astype(np.float32) * np.float32(0.05) - np.float32(0.3)
    return w, q, scales, mirror, idx, delta, qdelta


def test_c_program_switches_like_python(core, tmp_path):
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc)")
    from importlib.resources import files
    from pathlib import Path

    header_dir = Path(str(files("shira_runtime.kernels.csrc") / "shira_core.h")).parent
    lib = core.library_path()
    exe = tmp_path / "c_switch"
    src = Path(__file__).with_name("c_switch.c")
    build = [cc, "-std=c11", "-O2", "-Wall", f"-I{header_dir}", str(src), str(lib), f"-Wl,-rpath,{lib.parent}",
             "-o", str(exe)]  # fmt: skip
    subprocess.run(build, check=True, capture_output=True)
    out = subprocess.run([str(exe)], capture_output=True, check=False)
    assert out.returncode == 0, out.stderr.decode()

    for impl in (core, reference_np):
        w, q, scales, mirror, idx, delta, qdelta = _c_inputs()
        w0, q0, m0 = w.copy(), q.copy(), mirror.copy()
        qw = q.reshape(R, C)
        saved, qsaved, sat = np.zeros(K, np.float32), np.zeros(K, np.int8), np.zeros(2, np.int64)
        impl.apply_([w, qw], [idx, idx], [delta, qdelta], [saved, qsaved], True,
                    [np.empty(0, np.float32), scales], sat, [np.empty(0, np.uint8), mirror])  # fmt: skip
        first = b"".join(a.tobytes() for a in (w, saved, q, qsaved, mirror, sat))
        impl.restore_([w, qw], [idx, idx], [saved, qsaved], True, [np.empty(0, np.uint8), mirror])
        second = b"".join(a.tobytes() for a in (w, q, mirror))
        assert second == b"".join(a.tobytes() for a in (w0, q0, m0))
        assert out.stdout == first + second, f"{impl.__name__}: the C program's bytes differ"


def test_pool_shared_by_threads_and_a_busy_cpu(core, np_knobs):
    """Threaded calls from four Python threads at once, while another process keeps a CPU busy: every result
    exact (the pool's join/close protocol loses no task and runs none twice; a late worker joins nothing)."""
    import subprocess
    import sys
    import threading

    np_knobs(True, chunk=64)
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    results: list[bool] = []

    def worker(seed: int) -> None:
        g = np.random.default_rng(seed)
        w = g.standard_normal(50_000).astype(np.float32)
        base = w.copy()
        idx = np.sort(g.choice(w.size, 2000, replace=False)).astype(np.int32)
        d = g.standard_normal(idx.size).astype(np.float32)
        s = np.zeros(idx.size, np.float32)
        want = base.copy()
        want[idx] = (base[idx] + d).astype(np.float32)
        ok = True
        for _ in range(300):
            core.apply_([w], [idx], [d], [s], validate=False)
            ok &= bool(np.array_equal(w.view(np.int32), want.view(np.int32)))
            core.restore_([w], [idx], [s], validate=False)
            ok &= bool(np.array_equal(w.view(np.int32), base.view(np.int32)))
        results.append(ok)

    try:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a call never returned"
    finally:
        spin.kill()
        spin.wait()
    assert results == [True] * 4
