"""The PEFT rows of ``benchmarks.switch_latency``: PEFT's own fused switch, the peer a user would otherwise pick.

PEFT keeps every loaded adapter beside the base layers and switches a fused (merged) model by
``unmerge_adapter()`` (subtract the active delta), ``set_adapter(name)``, ``merge_adapter()`` (add the new one).
The rows time that cycle for the user's PEFT adapter directories (``--shira``/``--lora``), or else two SHiRA and two
LoRA adapters made by PEFT itself (random values, ``init_weights=False`` / ``init_lora_weights=False``) on the same
model and targets as the other rows: SHiRA
with ``r`` chosen so its nonzeros match ``--density`` over the targeted weights (PEFT's SHiRA has one ``r`` per
adapter: ``r * (out + in)`` entries per layer), LoRA with ``--rank``. Inference and generation run the merged
model (no extra matmuls), as PEFT serves it. PEFT wraps the model in place: these rows run last, and the model
is unwrapped afterwards.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from benchmarks.common import progress
from benchmarks.switch_rows import Config, Row
from benchmarks.timing import cycle, generation


def peft_unavailable(cfg: Config, model: nn.Module) -> str | None:
    """Why the PEFT rows cannot run (None: they can)."""
    if cfg.no_peft:
        return "--no-peft given"
    try:
        import peft  # noqa: F401
    except ImportError:
        return "peft is not installed (pip install -e '.[test]')"
    if not type(model).__module__.startswith("transformers."):
        return "the model is not a transformers model (PEFT wraps those)"
    return None


def shira_r(model: nn.Module, targets: tuple[str, ...], density: float) -> int:
    """PEFT SHiRA's ``r`` whose ``r * (out + in)`` entries per targeted linear add up to ``density`` of them."""
    cells, sides = 0, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.split(".")[-1] in targets:
            out_f, in_f = mod.weight.shape
            cells, sides = cells + out_f * in_f, sides + out_f + in_f
    if not sides:
        raise SystemExit(f"--targets {targets}: no nn.Linear of the model matches")
    return max(1, round(density * cells / sides))


def peft_rows(cfg: Config, model: nn.Module, dtype: str, ctx: dict) -> list[Row]:
    """PEFT's SHiRA and LoRA switches (unmerge, set_adapter, merge), each with generation after it."""
    import peft

    rows = []
    r = shira_r(model, cfg.targets, cfg.density)
    configs = {
        "shira": peft.ShiraConfig(r=r, target_modules=list(cfg.targets), init_weights=False),
        "lora_fused": peft.LoraConfig(r=cfg.rank, target_modules=list(cfg.targets), init_lora_weights=False),
    }
    users = {"shira": cfg.shira, "lora_fused": cfg.lora}
    for method, config in configs.items():
        dirs = [Path(p) for p in users[method][:2]]
        if dirs and all(d.is_dir() for d in dirs):  # the user's PEFT adapters (one is switched against itself)
            pm = peft.PeftModel.from_pretrained(model, str(dirs[0]), adapter_name="a")
            pm.load_adapter(str(dirs[-1]), adapter_name="b")
            origin = "user adapters"
        else:
            pm = peft.get_peft_model(model, config, adapter_name="a")
            pm.add_adapter("b", config)
            origin = "random adapters"
        pm.eval()
        nonzeros = sum(p.numel() for n, p in pm.named_parameters() if ".a." in f".{n}." or n.endswith(".a"))
        pm.set_adapter("a")
        pm.merge_adapter()

        def to(name: str, pm=pm):
            def run() -> None:
                pm.unmerge_adapter()
                pm.set_adapter(name)
                pm.merge_adapter()

            return run

        reps = max(3, cfg.repeats // 4)
        progress(f"{dtype}: PEFT's own {method} switch (unmerge, set_adapter, merge), {reps} repeats")
        t = cycle([to("b"), to("a")], reps)
        gen = None
        if hasattr(pm, "generate"):
            progress(f"  generation with PEFT's merged {method} adapter: prompt {cfg.tokens}, 1 + {cfg.new_tokens}")
            ids = ctx["prompt"]
            gen = generation(
                lambda n, pm=pm, ids=ids: pm.generate(input_ids=ids, max_new_tokens=n, do_sample=False),
                cfg.new_tokens,
                cfg.gen_repeats,
            )
        what = f"SHiRA r={r}" if method == "shira" else f"LoRA rank {cfg.rank}"
        what = what if origin.startswith("random") else origin
        note = f"PEFT {peft.__version__} merged, {what}, {nonzeros / 1e6:.1f}M adapter params"
        rows.append(Row.of(method, "peft", dtype, t, 0, note).with_gen(gen))
        pm.unmerge_adapter()
        model = pm.unload()  # the base model, unwrapped, for the next method
    return rows
