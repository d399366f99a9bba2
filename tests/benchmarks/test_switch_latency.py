"""The benchmark runs end to end (--quick) and its memory floor arithmetic is right."""

from __future__ import annotations

import json

import pytest
import torch

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


def test_quick_run_writes_every_method_row(tmp_path, capsys):
    out = tmp_path / "r.json"
    main(["--quick", "--dtype", "fp32", "bf16", "--json", str(out), "--repeats", "3", "--mask", "rand"])
    data = json.loads(out.read_text())
    assert {"config", "machine", "copy_gbps", "results"} <= set(data)
    assert data["copy_gbps"] > 0
    methods = {(r["method"], r["backend"].split("/")[0], r["dtype"]) for r in data["results"]}
    for dtype in ("fp32", "bf16"):
        for m in ("base", "shira", "lora_fused", "lora_unfused"):
            assert (m, "torch", dtype) in methods
    # onnxruntime rows: every method for fp32; bf16 is skipped, and the output says why
    for m in ("base", "shira", "lora_fused", "lora_unfused"):
        assert (m, "onnxruntime", "fp32") in methods
    assert not any(b == "onnxruntime" and d == "bf16" for _, b, d in methods)
    assert any("bf16" in line for line in data["skipped"])
    for dtype in ("fp32", "bf16"):  # PEFT's own switch, the peer
        assert {("shira", "peft", dtype), ("lora_fused", "peft", dtype)} <= methods
    lvp = data["live_vs_prepacked"]  # the KV-cache bundle's decode step and prefill against a prepacked session
    assert lvp["dtype"] == "fp32" and lvp["decode_step"] > 0 and lvp["prefill_64"] > 0
    for r in data["results"]:
        # what a user feels: the first token after a switch, and the decode rate after it (KV cache everywhere)
        assert r["ttft_ms"] > r["switch_ms"] and r["decode_tokens_per_s"] > 0
        if r["backend"] == "peft":  # timed through generation only
            continue
        for key in (
            "method",
            "backend",
            "dtype",
            "switch_ms",
            "switch_p90_ms",
            "infer_ms",
            "infer_overhead",
            "floor_ms",
            "rss_mb",
        ):
            assert key in r
        assert r["infer_ms"] > 0 and r["rss_mb"] > 0
        if r["method"] == "shira":
            assert r["floor_ms"] > 0 and r["switch_ms"] > 0
    printed = capsys.readouterr().out
    assert "lora_unfused" in printed and "x floor" in printed and "skipped: onnxruntime rows for bf16" in printed
    assert "TTFT ms" in printed and "live vs prepacked" in printed


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


def test_quantized_dtypes_rows(tmp_path, capsys):
    """--dtype int8 fp8_e4m3: the fp32 model quantized; SHiRA on the grid (floor from 1-byte lines), LoRA fused
    the PEFT way (requantize) and unfused; int8 also on an int8 bundle (SHiRA live, LoRA in slots); PEFT, the
    runtime's exact fused LoRA and fp8 bundles skipped, said why."""
    out = tmp_path / "r.json"
    argv = ["--quick", "--dtype", "int8", "fp8_e4m3", "--repeats", "2", "--infer-repeats", "1", "--mask", "rand"]
    main([*argv, "--new-tokens", "2", "--gen-repeats", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    rows = {(r["method"], r["backend"], r["dtype"], r.get("mask")): r for r in data["results"]}
    backends = {"int8": {"torch", "onnxruntime"}, "fp8_e4m3": {"torch"}}
    for fmt in ("int8", "fp8_e4m3"):
        assert {r["backend"].split("/")[0] for r in data["results"] if r["dtype"] == fmt} == backends[fmt]
        shira = rows[("shira", "torch/cpp", fmt, "rand")]
        assert shira["switch_ms"] > 0 and shira["floor_ms"] > 0 and shira["infer_ms"] > 0
        fused = rows[("lora_fused", "torch/requantize", fmt, None)]
        assert fused["switch_ms"] > 0 and fused["infer_ms"] > 0 and "requantize" in fused["note"]
        assert rows[("lora_unfused", "torch/hooks", fmt, None)]["infer_overhead"] > 0
        assert ("lora_fused", "torch/runtime-exact", fmt, None) not in rows
        for what in ("peft rows", "lora_fused torch/runtime-exact"):
            assert any(line.startswith(f"{what} for {fmt}: ") for line in data["skipped"])
    assert "onnxruntime rows for fp8_e4m3: bundles hold int8 bases only" in "\n".join(data["skipped"])
    assert any(line.startswith("lora_fused onnxruntime/rebuild for int8: ") for line in data["skipped"])
    live = rows[("shira", "onnxruntime/live", "int8", "rand")]  # the same codes, and the graph's transposed copy
    assert live["switch_ms"] > 0 and live["floor_ms"] > rows[("shira", "torch/cpp", "int8", "rand")]["floor_ms"]
    assert live["bytes_written"] == 2 * rows[("shira", "torch/cpp", "int8", "rand")]["bytes_written"]
    assert rows[("lora_unfused", "onnxruntime/slots", "int8", None)]["infer_overhead"] > 0
    assert data["live_vs_prepacked_by_dtype"]["int8"]["decode_step"] > 0
    # the same adapters on two 1-byte formats: the same code bytes; FP8 also writes its bf16 compute copy beside
    # them (2 bytes per entry, and the copy's lines join the floor)
    q8, f8 = rows[("shira", "torch/cpp", "int8", "rand")], rows[("shira", "torch/cpp", "fp8_e4m3", "rand")]
    assert f8["bytes_written"] == 3 * q8["bytes_written"] > 0 and f8["floor_ms"] > q8["floor_ms"]
    printed = capsys.readouterr().out
    assert "torch/requantize" in printed and "skipped: peft rows for int8" in printed
