"""Read Hugging Face PEFT adapter directories (SHiRA and LoRA) into our adapters, keyed by base tensor names.

PEFT key ``base_model.model.<module path>.shira_weight`` (or ``.lora_A.weight``) maps to the base tensor
``<module path>.weight``, the name ``state_dict()`` gives it. Files are read with safetensors only (no pickle).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from runtime.errors import AdapterFormatError
from runtime.lora import LoraAdapter
from runtime.sparse import SparseAdapter

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def is_peft_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def read_config(directory: Path) -> dict:
    cfg_path = directory / CONFIG
    if not cfg_path.is_file():
        raise AdapterFormatError(f"{directory}: no {CONFIG}; not a PEFT adapter directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{cfg_path}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict) or "peft_type" not in cfg:
        raise AdapterFormatError(f"{cfg_path}: no 'peft_type' field")
    return cfg


def read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS
    if not path.is_file():
        hint = (
            " (adapter_model.bin is pickle: re-save with safe_serialization=True)"
            if (directory / "adapter_model.bin").exists()
            else ""
        )
        raise AdapterFormatError(f"{directory}: no {WEIGHTS}{hint}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"{path}: unreadable safetensors file ({exc})") from exc


def _module_path(key: str, suffix: str) -> str:
    path = key[: -len(suffix)]
    return path[len(PREFIX) :] if path.startswith(PREFIX) else path


def load_peft(directory: str | Path) -> SparseAdapter | LoraAdapter:
    directory = Path(directory)
    cfg = read_config(directory)
    kind = str(cfg["peft_type"]).upper()
    if kind == "SHIRA":
        return _load_shira(directory, cfg)
    if kind == "LORA":
        return _load_lora(directory, cfg)
    raise AdapterFormatError(f"{directory / CONFIG}: peft_type {cfg['peft_type']!r} is not supported (SHIRA, LORA)")


def _unexpected(directory: Path, keys: list[str]) -> None:
    if keys:
        raise AdapterFormatError(
            f"{directory / WEIGHTS}: tensors this runtime cannot apply (modules_to_save or other extras): "
            f"{keys[:5]}{' ...' if len(keys) > 5 else ''}"
        )


def _pairs(
    directory: Path, tensors: dict[str, torch.Tensor], first: str, second: str, label: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split PEFT keys ending in ``first`` / ``second`` by module path; anything else, or a half pair, is refused."""
    a, b, other = {}, {}, []
    for key, t in tensors.items():
        if key.endswith(first):
            a[_module_path(key, first)] = t
        elif key.endswith(second):
            b[_module_path(key, second)] = t
        else:
            other.append(key)
    _unexpected(directory, other)
    unpaired = sorted(set(a) ^ set(b))
    if unpaired:
        raise AdapterFormatError(f"{directory / WEIGHTS}: {label} not paired for {unpaired}")
    return a, b


def _load_shira(directory: Path, cfg: dict) -> SparseAdapter:
    tensors = read_tensors(directory)
    values, indices = _pairs(directory, tensors, ".shira_weight", ".shira_indices", "shira_weight/shira_indices")
    values = {m + ".weight": t for m, t in values.items()}
    indices = {m + ".weight": t for m, t in indices.items()}
    for name, idx in indices.items():
        if idx.dim() != 2 or idx.shape[0] != 2:
            raise AdapterFormatError(
                f"{directory / WEIGHTS}: {name} shira_indices has shape {tuple(idx.shape)}, expected [2, N]"
            )
        if idx.dtype.is_floating_point:  # some writers store indices as float
            if not bool((idx == idx.round()).all()):
                raise AdapterFormatError(f"{directory / WEIGHTS}: {name} shira_indices holds non-integer values")
        idx = idx.to(torch.int64)
        if cfg.get("fan_in_fan_out"):
            idx = idx.flip(0)  # PEFT's delta is [out, in]; the base stores [in, out]
        indices[name] = idx
    return SparseAdapter(indices, values, scale=1.0, mask_kind=str(cfg.get("mask_type", "random")))


def _pattern_value(patterns: dict, module: str, default):
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _load_lora(directory: Path, cfg: dict) -> LoraAdapter:
    if cfg.get("use_dora"):
        raise AdapterFormatError(f"{directory / CONFIG}: DoRA adapters are not supported")
    if cfg.get("lora_bias") or cfg.get("bias", "none") != "none":
        raise AdapterFormatError(f"{directory / CONFIG}: LoRA adapters that train biases are not supported")
    tensors = read_tensors(directory)
    A, B = _pairs(directory, tensors, ".lora_A.weight", ".lora_B.weight", "lora_A/lora_B")
    scaling = {}
    for module, a in A.items():
        r = int(a.shape[0]) if a.dim() == 2 else 0
        if r <= 0:
            raise AdapterFormatError(f"{directory / WEIGHTS}: {module}.lora_A.weight has shape {tuple(a.shape)}")
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8)))
        scaling[module + ".weight"] = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return LoraAdapter(
        {m + ".weight": a for m, a in A.items()},
        {m + ".weight": b for m, b in B.items()},
        scaling,
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out")),
    )


def save_peft_shira(adapter: SparseAdapter, directory: str | Path, strict: bool = True) -> Path:
    """Write ``adapter`` as a PEFT SHiRA directory (``adapter_config.json`` + ``adapter_model.safetensors``).

    PEFT sizes each layer's ``shira_weight`` as ``r * (out + in)`` with one ``r`` for the whole adapter, so an
    adapter whose nonzero counts do not fit that rule cannot be loaded by PEFT: refused unless ``strict=False``.
    Values are written in fp32 (PEFT's dtype); the adapter's ``scale`` is folded into them.
    """
    directory = Path(directory)
    tensors, ranks, modules = {}, set(), []
    for name in sorted(adapter.indices):
        shape = adapter.shapes.get(name)
        if shape is None or len(shape) != 2 or not name.endswith(".weight"):
            raise AdapterFormatError(f"tensor {name!r}: PEFT SHiRA needs the 2-D weight of a linear layer")
        idx, val = adapter.flat(name, shape, adapter="<to_peft>")
        module = name[: -len(".weight")]
        modules.append(module)
        r, rem = divmod(idx.numel(), shape[0] + shape[1])
        ranks.add(r if rem == 0 else None)
        rows, cols = idx.long() // shape[1], idx.long() % shape[1]
        tensors[f"{PREFIX}{module}.shira_indices"] = torch.stack([rows, cols]).to(torch.int32)
        tensors[f"{PREFIX}{module}.shira_weight"] = val.to(torch.float32) * float(adapter.scale)
    if strict and (len(ranks) != 1 or None in ranks):
        raise AdapterFormatError(
            "PEFT could not load this adapter: its layers' nonzero counts are not r * (out + in) for one integer r "
            "(pass strict=False to write it anyway)"
        )
    r = max((x for x in ranks if x), default=1)
    config = {
        "peft_type": "SHIRA",
        "r": r,
        "mask_type": adapter.mask_kind,
        "target_modules": modules,
        "fan_in_fan_out": False,
        "init_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "random_seed": None,
        "base_model_name_or_path": None,
        "task_type": None,
    }
    directory.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(config, indent=2))
    return directory
