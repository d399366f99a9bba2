"""The benchmark runs end to end (--quick) and its memory floor arithmetic is right."""

from __future__ import annotations

import json
import math

import pytest
import torch
from shira_runtime import kernels

from benchmarks.common import memory_floor_ms, touched_lines
from benchmarks.switch_latency import main


def test_touched_lines_and_floor_hand_counted():
    idx = torch.tensor([0, 1, 15, 16, 17, 100], dtype=torch.int32)
    # fp32: byte offsets 0, 4, 60 | 64, 68 | 400 -> lines 0, 1, 6
    assert touched_lines(idx, 4) == 3
    # bf16: byte offsets 0, 2, 30, 32, 34 | 200 -> lines 0, 3
    assert touched_lines(idx, 2) == 2
    # a tensor starting 60 bytes into its line: fp32 offsets 60 | 64, 120 | 124, 128, 460 -> lines 0, 1, 2, 7
    assert touched_lines(idx, 4, base_offset=60) == 4
    assert touched_lines(torch.empty(0, dtype=torch.int32), 4) == 0
    # 3 lines, read and written, at 1 GB/s: 3 * 64 * 2 bytes / 1e9 B/s = 384 ns
    assert memory_floor_ms(3, 1.0) == pytest.approx(3.84e-4)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_quick_run_the_default_path(tmp_path, capsys):
    """--quick runs what the default runs (fp32, torch, onnxruntime and PEFT rows), on the tiny preset: every row
    with finite, positive figures, the base at 1x itself, the consistency checks and the noise they rest on."""
    out = tmp_path / "r.json"
    main(["--quick", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["config"]["preset"] == "tiny" and data["copy_gbps"] > 0
    rows = {(r["method"], r["backend"], r.get("mask")): r for r in data["results"]}
    expected = {
        ("base", "torch", None),
        ("shira", "torch/torch", "rand"),
        ("shira", "torch/torch", "block"),
        ("lora_fused", "torch/unmerge-merge", None),
        ("lora_fused", "torch/runtime-exact", None),
        ("lora_unfused", "torch/hooks", None),
        ("base", "onnxruntime/live", None),
        ("shira", "onnxruntime/live", "rand"),
        ("lora_fused", "onnxruntime/rebuild", None),
        ("lora_unfused", "onnxruntime/slots", None),
        ("shira", "peft", None),
        ("lora_fused", "peft", None),
    }
    assert expected <= set(rows)
    for r in data["results"]:
        # every method: the first token after its switch and the decode rate after it (KV cache everywhere)
        if r["mask"] != "block":
            assert _finite(r["ttft_ms"]) and r["ttft_ms"] > r["switch_ms"] >= 0
            assert _finite(r["decode_tokens_per_s"]) and r["decode_tokens_per_s"] > 0
        assert _finite(r["rss_mb"]) and r["rss_mb"] > 0
        if r["method"] != "base":
            assert _finite(r["switch_ms"]) and 0 < r["switch_ms"] <= r["switch_p90_ms"]
        if r["method"] == "shira" and r["backend"] != "peft":
            assert r["floor_ms"] > 0 and _finite(r["floor_ratio"]) and r["floor_ratio"] > 0.1
        if r["backend"] != "peft" and r["mask"] != "block":
            assert _finite(r["infer_ms"]) and r["infer_ms"] > 0 and r["infer_b1_ms"] > 0
            assert _finite(r["infer_overhead"]) and r["infer_overhead"] > 0
            assert _finite(r["decode_x_base"]) and r["decode_x_base"] > 0
    for backend in ("torch", "onnxruntime/live"):
        base = rows[("base", backend, None)]
        assert base["switch_ms"] == 0 and base["infer_overhead"] == 1.0 and base["decode_x_base"] == 1.0
    # both kernel paths of one mask share one inference measurement (the same weights, the same code path)
    assert rows[("shira", "torch/torch", "rand")]["infer_ms"] > 0
    assert rows[("shira", "torch/torch", "block")]["infer_ms"] is None
    # SHiRA against the base on each backend: ratios, a verdict, and the noise the verdict rests on
    assert set(data["consistency"]) == {"fp32 torch", "fp32 onnxruntime"}
    for key, c in data["consistency"].items():
        assert _finite(c["infer_x_base"]) and c["infer_x_base"] > 0 and _finite(c["decode_x_base"])
        backend = f"torch/{kernels.backend()}" if key.endswith("torch") else "onnxruntime/live"
        assert c["infer_x_base"] == rows[("shira", backend, "rand")]["infer_overhead"]
        assert c["consistent"] == (abs(c["infer_x_base"] - 1) <= 0.05 and abs(c["decode_x_base"] - 1) <= 0.05)
        assert isinstance(c["noisy"], bool)
    for n in data["noise"]["fp32"].values():
        assert n["base_infer_spread"] >= 0 and n["base_gen_spread"] >= 0
        assert n["other_cpus"] is None or n["other_cpus"] >= 0
    assert data["machine"]["omp_wait_policy"]
    lvp = data["live_vs_prepacked"]  # the KV-cache bundle's decode step and prefill against a prepacked session
    assert lvp["dtype"] == "fp32" and lvp["decode_step"] > 0 and lvp["prefill_64"] > 0
    printed = capsys.readouterr()
    for label in ("lora_unfused", "x floor", "TTFT ms", "decode x base", "live vs prepacked", "check fp32 torch: "):
        assert label in printed.out
    assert "phase" in printed.err  # the progress bar (tqdm, on stderr)
    noisy = any(c["noisy"] for c in data["consistency"].values())
    assert ("WARNING:" in printed.out) == noisy


@pytest.mark.slow
def test_quick_run_two_dtypes(tmp_path, capsys):
    out = tmp_path / "r.json"
    main(["--quick", "--dtype", "fp32", "bf16", "--json", str(out), "--repeats", "3", "--mask", "rand"])
    data = json.loads(out.read_text())
    methods = {(r["method"], r["backend"].split("/")[0], r["dtype"]) for r in data["results"]}
    for dtype in ("fp32", "bf16"):
        for m in ("base", "shira", "lora_fused", "lora_unfused"):
            assert (m, "torch", dtype) in methods
        assert {("shira", "peft", dtype), ("lora_fused", "peft", dtype)} <= methods
    # onnxruntime rows for fp32; bf16 is skipped, and the output says why
    assert not any(b == "onnxruntime" and d == "bf16" for _, b, d in methods)
    assert any("bf16" in line for line in data["skipped"])
    assert "bf16 torch" in data["consistency"] and "bf16 onnxruntime" not in data["consistency"]
    assert "skipped: onnxruntime rows for bf16" in capsys.readouterr().out


def test_help_says_how_long_each_choice_takes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "default: medium" in out
    for choice in ("(no flags)", "--quick", "--preset llama-1b", "--hf DIR"):
        assert choice in out.split("how long a run takes")[1]


def test_switch_rows_per_mask(tmp_path, capsys):
    """--mask: one pair of SHiRA switch rows per mask kind (grad: a calibration pass), each with the floors of
    the lines its adapters touch; the first mask's rows also time inference; the ratios are printed."""
    out = tmp_path / "r.json"
    argv = ["--quick", "--no-onnx", "--no-peft", "--repeats", "2", "--infer-repeats", "1", "--json", str(out)]
    main([*argv, "--mask", "rand", "block", "struct", "grad"])
    rows = [r for r in json.loads(out.read_text())["results"] if r["method"] == "shira"]
    assert [r["mask"] for r in rows] == ["rand", "rand", "block", "block", "struct", "struct", "grad", "grad"]
    for r in rows:
        assert r["switch_ms"] > 0 and r["floor_ms"] > 0 and r["streams_floor_ms"] > r["floor_ms"]
        assert (r["infer_ms"] is not None) == (r["mask"] == "rand")
    floors = {r["mask"]: r["floor_ms"] for r in rows}
    assert floors["block"] < floors["rand"] / 4  # a cache-line mask touches far fewer lines (16 fp32 per line)
    printed = capsys.readouterr().out
    assert (
        "SHiRA switch by mask" in printed
        and "rand / block = " in printed
        and "LoRA fused (unmerge-merge) / block" in printed
    )


def test_no_onnx_and_no_peft_skip_their_rows_and_say_so(tmp_path):
    out = tmp_path / "r.json"
    main(["--quick", "--no-onnx", "--no-peft", "--repeats", "2", "--infer-repeats", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    assert {r["backend"].split("/")[0] for r in data["results"]} == {"torch"}
    assert data["skipped"] == ["onnxruntime rows for fp32: --no-onnx given", "peft rows for fp32: --no-peft given"]
    # the fast subset's check of the default path's torch figures and of the consistency fields
    for r in data["results"]:
        if r["mask"] != "block":  # the first mask's rows (and every other method) time inference
            assert _finite(r["infer_overhead"]) and r["infer_overhead"] > 0
    c = data["consistency"]["fp32 torch"]
    assert set(c) == {"infer_x_base", "decode_x_base", "consistent", "noisy"} and c["infer_x_base"] > 0
    assert data["noise"]["fp32"]["torch"]["base_infer_spread"] >= 0


def test_user_model_and_peft_adapters(tmp_path):
    """--hf with a transformers directory and the user's own PEFT SHiRA and LoRA adapters."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "hf")
    dirs = {}
    for name, conf in {
        "s1": peft.ShiraConfig(r=2, target_modules=["q_proj", "v_proj"], random_seed=1, init_weights=False),
        "s2": peft.ShiraConfig(r=2, target_modules=["q_proj", "v_proj"], random_seed=2, init_weights=False),
        "l1": peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        "l2": peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    }.items():
        peft.get_peft_model(transformers.LlamaForCausalLM(cfg), conf).save_pretrained(tmp_path / name)
        dirs[name] = str(tmp_path / name)
    out = tmp_path / "r.json"
    main(
        [
            "--hf",
            str(tmp_path / "hf"),
            "--shira",
            dirs["s1"],
            dirs["s2"],
            "--lora",
            dirs["l1"],
            dirs["l2"],
            "--repeats",
            "3",
            "--infer-repeats",
            "1",
            "--json",
            str(out),
        ]
    )
    rows = json.loads(out.read_text())["results"]
    shira = [r for r in rows if r["method"] == "shira" and r["backend"].startswith("torch")]
    assert shira and all("user adapters" in r["note"] for r in shira)
    # 2 adapters x r=2 x (out + in) per layer (q [32, 32], v [16, 32]) x 4 bytes (fp32)
    assert shira[0]["bytes_written"] == 2 * 2 * ((32 + 32) + (16 + 32)) * 4
    assert {r["method"] for r in rows} == {"base", "shira", "lora_fused", "lora_unfused"}
    # --hf: the directory's model on torch, exported with its KV cache for onnxruntime, and under PEFT itself
    assert {r["backend"].split("/")[0] for r in rows} == {"torch", "onnxruntime", "peft"}
    assert all("user adapters" in r["note"] for r in rows if r["backend"] == "peft")


@pytest.mark.slow
def test_quantized_dtypes_rows(tmp_path, capsys):
    """--dtype int8 fp8_e4m3: the fp32 model quantized; SHiRA on the grid (floor from 1-byte lines), LoRA fused
    the PEFT way (requantize) and unfused; int8 also on an int8 bundle (SHiRA live, LoRA in slots); PEFT, the
    runtime's exact fused LoRA and fp8 bundles skipped, said why."""
    out = tmp_path / "r.json"
    argv = ["--quick", "--dtype", "int8", "fp8_e4m3", "--repeats", "2", "--infer-repeats", "1", "--mask", "rand"]
    main([*argv, "--new-tokens", "2", "--gen-repeats", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    rows = {(r["method"], r["backend"], r["dtype"], r.get("mask")): r for r in data["results"]}
    fast = f"torch/{kernels.backend()}"
    backends = {"int8": {"torch", "onnxruntime"}, "fp8_e4m3": {"torch"}}
    for fmt in ("int8", "fp8_e4m3"):
        assert {r["backend"].split("/")[0] for r in data["results"] if r["dtype"] == fmt} == backends[fmt]
        shira = rows[("shira", fast, fmt, "rand")]
        assert shira["switch_ms"] > 0 and shira["floor_ms"] > 0 and shira["infer_ms"] > 0
        fused = rows[("lora_fused", "torch/requantize", fmt, None)]
        assert fused["switch_ms"] > 0 and fused["infer_ms"] > 0 and "requantize" in fused["note"]
        assert rows[("lora_unfused", "torch/hooks", fmt, None)]["infer_overhead"] > 0
        assert ("lora_fused", "torch/runtime-exact", fmt, None) not in rows
        for what in ("peft rows", "lora_fused torch/runtime-exact"):
            assert any(line.startswith(f"{what} for {fmt}: ") for line in data["skipped"])
    assert "onnxruntime rows for fp8_e4m3: bundles hold int8 bases only" in "\n".join(data["skipped"])
    assert any(line.startswith("lora_fused onnxruntime/rebuild for int8: ") for line in data["skipped"])
    live = rows[("shira", "onnxruntime/live", "int8", "rand")]  # the graph's transposed copies, not the codes
    assert live["switch_ms"] > 0 and live["floor_ms"] > 0 and "transposed uint8 copies" in live["note"]
    assert live["bytes_written"] == rows[("shira", fast, "int8", "rand")]["bytes_written"]
    assert rows[("lora_unfused", "onnxruntime/slots", "int8", None)]["infer_overhead"] > 0
    assert data["live_vs_prepacked_by_dtype"]["int8"]["decode_step"] > 0
    # the same adapters on two 1-byte formats: the same code bytes; FP8 also writes its bf16 compute copy beside
    # them (2 bytes per entry, and the copy's lines join the floor)
    q8, f8 = rows[("shira", fast, "int8", "rand")], rows[("shira", fast, "fp8_e4m3", "rand")]
    assert f8["bytes_written"] == 3 * q8["bytes_written"] > 0 and f8["floor_ms"] > q8["floor_ms"]
    printed = capsys.readouterr().out
    assert "torch/requantize" in printed and "skipped: peft rows for int8" in printed


def test_int8_block_masks_are_lines_of_the_codes(tmp_path):
    """--dtype int8 --mask block: the adapters are made on the fp32 model, their blocks 64-byte lines of the int8
    codes (64 codes) the switch writes, not of the fp32 weights (16 elements: a quarter of a code line)."""
    out = tmp_path / "r.json"
    argv = ["--preset", "small", "--dtype", "int8", "--no-onnx", "--no-peft", "--repeats", "2", "--infer-repeats", "1"]
    main([*argv, "--mask", "rand", "block", "--new-tokens", "2", "--gen-repeats", "1", "--json", str(out)])
    rows = [r for r in json.loads(out.read_text())["results"] if r["method"] == "shira"]
    floors = {r["mask"]: r["floor_ms"] for r in rows}
    # 1% + 1% random codes touch ~73% of the lines (1 - 0.98^64); whole-line blocks 2%, quarter-line ones ~8%
    assert floors["block"] < floors["rand"] / 20


def test_huge_pages_flag_runs_the_torch_rows_on_moved_weights(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["--quick", "--no-onnx", "--no-peft", "--repeats", "2", "--infer-repeats", "1", "--mask", "rand"]
    main([*argv, "--huge-pages", "--json", str(out)])
    rows = [r for r in json.loads(out.read_text())["results"] if r["method"] == "shira"]
    assert rows and all(r["switch_ms"] > 0 for r in rows)
    assert "MB of weights on huge pages" in capsys.readouterr().err
