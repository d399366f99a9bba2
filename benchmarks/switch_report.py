"""Printing and plotting the results of ``benchmarks.switch_latency``."""

from __future__ import annotations

from shira_runtime.table import print_table


def package_version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def report(out: dict) -> None:
    rows, c = out["results"], out["config"]
    m = out["machine"]
    print(
        f"\nswitch latency, model {c['hf'] or c['preset']}, density {c['density']}, "
        f"LoRA rank {out['config']['rank']}, copy bandwidth {out['copy_gbps']:.1f} GB/s, "
        f"kernels {m['kernels']}, {m['cores']} cores, {m['threads']} threads, "
        f"OMP_WAIT_POLICY {m.get('omp_wait_policy')}"
    )
    for dtype in out["config"]["dtypes"]:
        sub = [r for r in rows if r["dtype"] == dtype]
        shira = {}  # backend family (torch, onnxruntime) -> the fastest SHiRA switch there
        for r in sub:
            if r["method"] == "shira":
                fam = r["backend"].split("/")[0]
                shira[fam] = min(shira.get(fam, r["switch_ms"]), r["switch_ms"])
        by_mask(sub)
        print()
        print_table(
            [
                "method",
                "mask",
                "backend",
                "dtype",
                "switch ms",
                "p90 ms",
                "floor ms",
                "x floor",
                "x streams floor",
                "x shira",
                "infer ms",
                "1-tok ms",
                "infer x base",
                "TTFT ms",
                "decode tok/s",
                "decode x base",
                "MB written",
                "peak rss MB",
                "note",
            ],
            [
                [
                    r["method"],
                    r.get("mask"),
                    r["backend"],
                    r["dtype"],
                    r["switch_ms"],
                    r["switch_p90_ms"],
                    r["floor_ms"],
                    r["floor_ratio"],
                    r.get("streams_floor_ratio"),
                    r["switch_ms"] / shira[fam]
                    if (fam := r["backend"].split("/")[0]) in shira and r["switch_ms"]
                    else None,
                    r["infer_ms"],
                    r["infer_b1_ms"],
                    r["infer_overhead"],
                    r.get("ttft_ms"),
                    r.get("decode_tokens_per_s"),
                    r.get("decode_x_base"),
                    r["bytes_written"] / 1e6,
                    r["rss_mb"],
                    r["note"],
                ]
                for r in sub
            ],
        )
    print(
        "\nx shira: against the fastest SHiRA switch on the same backend; infer x base, decode x base: against the "
        "base there, timed in turns with it (medians of the paired ratios)"
    )
    print(
        "x floor: against the time to read and write the weight lines the two adapters touch, at the copy "
        "bandwidth; x streams floor: adding the adapters' own bytes (saved values, deltas, indices)"
    )
    print(
        f"TTFT: the switch, then a prompt of {c['tokens']} tokens and the first new token; decode tok/s: the "
        f"{c['new_tokens']} tokens after it, with the method active (KV cache on both backends)"
    )
    lvp = out.get("live_vs_prepacked")
    if lvp:
        prefill = lvp[f"prefill_{c['tokens']}"]
        print(
            f"live vs prepacked onnxruntime session ({lvp['dtype']}, same graph, this run): one decode step "
            f"{lvp['decode_step']:.2f}x, prefill of {c['tokens']} tokens {prefill:.2f}x"
        )
    for line in out["skipped"]:
        print(f"skipped: {line}")
    consistency_lines(out)


def consistency_lines(out: dict) -> None:
    """SHiRA against the base on each backend (the same code path: both ratios should read 1.00), and a warning
    where the machine was too noisy for the table to be trusted."""
    for key, c in out.get("consistency", {}).items():
        decode = f"{c['decode_x_base']:.2f}" if c["decode_x_base"] is not None else "-"
        verdict = "consistent" if c["consistent"] else "NOT consistent"
        print(f"check {key}: shira infer x base {c['infer_x_base']:.2f}, decode x base {decode}: {verdict} (+-5%)")
    for dtype, backends in out.get("noise", {}).items():
        for backend, n in backends.items():
            others = n.get("other_cpus")
            spreads = [x for x in (n.get("base_infer_spread"), n.get("base_gen_spread")) if x is not None]
            noisy = [c["noisy"] for k, c in out.get("consistency", {}).items() if k == f"{dtype} {backend}"]
            if any(noisy):
                print(
                    f"WARNING: {dtype} {backend}: the machine was too noisy to trust these figures to a few percent: "
                    f"the base's repeated runs scattered {100 * max(spreads, default=0):.0f}% (median deviation), "
                    f"other processes kept {others or 0:.2f} CPUs busy meanwhile; rerun on a quiet machine"
                )


def by_mask(rows: list[dict]) -> None:
    """The SHiRA switch per mask kind (the fast kernel path) against the random mask and the fused LoRA switch."""
    fast = {}
    for r in rows:
        if r["method"] == "shira" and r["backend"].startswith("torch/") and r.get("mask"):
            fast[r["mask"]] = min(fast.get(r["mask"], r["switch_ms"]), r["switch_ms"])
    fused = {
        r["backend"]: r["switch_ms"] for r in rows if r["method"] == "lora_fused" and r["backend"].startswith("torch")
    }
    if len(fast) < 2 and not fused:
        return
    print(f"\nSHiRA switch by mask ({rows[0]['dtype']}, fastest kernel path, this run):")
    for mask, ms in fast.items():
        parts = [f"  {mask:>6}: {ms:8.2f} ms"]
        if "rand" in fast and mask != "rand":
            parts.append(f"rand / {mask} = {fast['rand'] / ms:.1f}x")
        parts += [f"LoRA fused ({b.split('/')[1]}) / {mask} = {f / ms:.1f}x" for b, f in fused.items()]
        print(", ".join(parts))


def plot(out: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in out["results"] if r["method"] != "base"]
    labels = [f"{r['method']} {r.get('mask') or ''}\n{r['backend']} {r['dtype']}" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.5 * len(rows) + 2), sharey=True)
    ax1.barh(labels, [r["switch_ms"] for r in rows], color="tab:blue")
    ax1.set_xscale("log")
    ax1.set_xlabel("switch latency, ms (log)")
    ax2.barh(labels, [r["infer_overhead"] or 0 for r in rows], color="tab:orange")
    ax2.axvline(1.0, color="k", lw=0.8)
    ax2.set_xlabel("inference time / base")
    fig.suptitle(f"{out['config']['preset']}: measured by python -m benchmarks.switch_latency")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
