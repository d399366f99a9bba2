"""benchmarks.onnx_quant: each onnxruntime form's liveness verdict and correctness, on small shapes (no timing)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import onnx_quant as bench

# what onnxruntime 1.32's CPU EP does with each form (on AVX2 without VNNI for the u8 x s8 row)
LIVE = {
    "fp32 live (Gemm, bound)": "live",
    "int8 prepacked DQ->Gemm": "frozen",
    "int8 file folded to fp32 (disable_quant_qdq)": "frozen",
    "int8 prepacked MatMulInteger u8u8": "frozen",
    "int8 prepacked MatMulNBits": "frozen",
    "int8 live DQ->Gemm (bound)": "live",
    "int8 live MatMulInteger u8u8 A (bound)": "live",
    "int8 live MatMulInteger u8u8 B [in,out] (bound)": "live",
    "int8 live MatMulInteger u8u8 B per-token 2-byte (bound; bundle's form)": "live",
    "int8 live MatMulInteger u8u8 B per-token (bound; bundle's 1-byte form)": "live",
    "int8 live MatMulInteger s8s8 A, per-token (bound; the bundle's first form)": "live",
    "int8 live MatMulNBits (bound)": "live",
    "int8 add_initializer DQ->Gemm noopt": "live",
    "int8 add_initializer DQ->Gemm opt": "live",
    "int8 add_initializer MatMulInteger u8u8 [in,out] opt": "live",
    # live on these small shapes; on llama-1b shapes its scales stop being read live ("wrong" in the benchmark)
    "int8 add_initializer MatMulNBits noopt": "live",
}


@pytest.fixture(scope="module")
def rows():
    cfg = bench.Config(((48, 32), (32, 64)), repeats=1, threads=1)
    return bench.run(cfg)


def test_every_form_gets_its_verdict(rows):
    got = {(r.shape, r.form): r.live for r in rows}
    for shape in ("48x32", "32x64"):
        for form, want in LIVE.items():
            assert got[(shape, form)] == want, (shape, form, got[(shape, form)])


def test_forms_that_run_are_correct_and_timed(rows):
    tol = {f.name: f.tol for f in bench.forms(1)}
    for r in rows:
        if r.form in LIVE:
            assert r.rel_err is not None and r.rel_err <= tol[r.form], r
            assert set(r.ms) == set(bench.TOKENS), r
            assert all(v > 0 for v in r.ms.values()), r
            assert r.vs_fp32 and r.vs_prepacked, r


def test_u8s8_matmulinteger_is_reported_not_timed(rows):
    # our int8 codes straight into MatMulInteger (what quantize_dynamic's default writes): MLAS's u8 x s8 kernel
    # on AVX2 without VNNI saturates its 16-bit pair sums, so the output is wrong there; elsewhere it is right
    for r in rows:
        if r.form == "int8 prepacked MatMulInteger u8s8":
            assert r.live in ("wrong", "frozen"), r
            assert (r.ms == {}) == (r.live == "wrong"), r


def test_the_live_check_catches_a_frozen_copy():
    rng = np.random.default_rng(1)
    w = bench.Weights(*bench.quantize_rows(rng.standard_normal((16, 32), dtype=np.float32)))
    x = rng.standard_normal((3, 32), dtype=np.float32)
    frozen = w.codes.copy(), w.scale.copy()
    assert bench.verdict(lambda x: bench.reference(x, *frozen), w, x, bench.EXACT_TOL, 0)[0] == "frozen"
    assert bench.verdict(lambda x: bench.reference(x, w.codes, w.scale), w, x, bench.EXACT_TOL, 0)[0] == "live"
    assert bench.verdict(lambda x: -bench.reference(x, w.codes, w.scale), w, x, bench.EXACT_TOL, 0)[0] == "wrong"
    np.testing.assert_array_equal(w.codes, frozen[0])  # the check restores the buffers
    np.testing.assert_array_equal(w.scale, frozen[1])


def test_nbits_codes_are_code_plus_128():
    codes = np.array([[-127, -1, 0, 1, 127]], np.int8)
    np.testing.assert_array_equal(bench.nbits_codes(codes)[:, 0], codes.astype(np.int16) + 128)


def test_quick_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "q.json"
    assert bench.main(["--quick", "--repeats", "1", "--threads", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {r["form"] for r in data["rows"]} >= set(LIVE)
    assert "live?" in capsys.readouterr().out
