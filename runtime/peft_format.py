"""Hugging Face PEFT adapter directories (SHiRA and LoRA), the one owner of their layout.

PEFT key ``base_model.model.<module path>.shira_weight`` (or ``.lora_A.weight``) maps to the base tensor
``<module path>.weight``, the name ``state_dict()`` gives it. Files are read with safetensors only (no pickle).
Everything the directory states is checked against what it holds: the ``peft_type``, ``r`` (PEFT sizes each
SHiRA layer's entries as ``r * (out + in)``; a LoRA layer's rank is ``r`` or its ``rank_pattern`` entry),
``target_modules``, ``lora_alpha`` and ``alpha_pattern`` (numbers; patterns that compile). A SHiRA directory
records no base shapes: ``r`` goes with the adapter (``peft_r``) and is checked against the base when the
adapter is applied. This module knows files only; ``shira_runtime.adapters`` builds the objects.

Reading needs numpy only (``shira_runtime.safetensors_np``): ``read`` returns numpy arrays (bf16/fp8 as
``ml_dtypes`` dtypes); ``write_shira`` takes torch tensors and imports torch when called.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from shira_runtime import safetensors_np
from shira_runtime.errors import AdapterFormatError

if TYPE_CHECKING:
    import torch

PREFIX = "base_model.model."
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def is_peft_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def read(directory: str | Path) -> tuple[str, dict[str, Any]]:
    """``("shira" | "lora", fields)``: the keyword arguments of ``SparseAdapter`` or ``LoraAdapter``."""
    directory = Path(directory)
    cfg = _config(directory)
    kind = str(cfg["peft_type"]).upper()
    if kind == "SHIRA":
        return "shira", _read_shira(directory, cfg)
    if kind == "LORA":
        return "lora", _read_lora(directory, cfg)
    raise AdapterFormatError(f"{directory / CONFIG}: peft_type {cfg['peft_type']!r} is not supported (SHIRA, LORA)")


def _config(directory: Path) -> dict:
    path = directory / CONFIG
    if not path.is_file():
        raise AdapterFormatError(f"{directory}: no {CONFIG}; not a PEFT adapter directory")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdapterFormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("peft_type"), str):
        raise AdapterFormatError(f"{path}: no 'peft_type' field")
    for key in ("fan_in_fan_out", "use_rslora", "use_dora"):
        if cfg.get(key) not in (None, True, False):
            raise AdapterFormatError(f"{path}: {key} must be true or false, got {cfg[key]!r}")
    return cfg


def _tensors(directory: Path) -> dict[str, np.ndarray]:
    path = directory / WEIGHTS
    if not path.is_file():
        hint = " (adapter_model.bin is pickle: re-save with safe_serialization=True)"
        raise AdapterFormatError(
            f"{directory}: no {WEIGHTS}{hint if (directory / 'adapter_model.bin').exists() else ''}"
        )
    return safetensors_np.read(path)[1]


def _pairs(directory: Path, cfg: dict, first: str, second: str) -> tuple[dict, dict]:
    """Split keys ending in ``first`` / ``second`` by module path; anything else, a half pair, or a module the
    config does not target is refused."""
    a, b, other = {}, {}, []
    for key, t in _tensors(directory).items():
        for suffix, into in ((first, a), (second, b)):
            if key.endswith(suffix):
                path = key[: -len(suffix)]
                into[path[len(PREFIX) :] if path.startswith(PREFIX) else path] = t
                break
        else:
            other.append(key)
    where = directory / WEIGHTS
    if other:
        more = " ..." if len(other) > 5 else ""
        raise AdapterFormatError(f"{where}: tensors this runtime cannot apply (modules_to_save?): {other[:5]}{more}")
    if set(a) != set(b):
        raise AdapterFormatError(f"{where}: {first}/{second} not paired for {sorted(set(a) ^ set(b))}")
    targets = cfg.get("target_modules")
    for module in a:
        if targets is not None and not _targeted(module, targets):
            raise AdapterFormatError(f"{where}: module {module!r} is not in the config's target_modules {targets!r}")
    return a, b


def _targeted(module: str, targets: Any) -> bool:
    if isinstance(targets, str):
        try:
            return re.fullmatch(targets, module) is not None or targets == module.split(".")[-1]
        except re.error:
            return False
    if isinstance(targets, list):
        return any(isinstance(t, str) and (module == t or module.endswith("." + t)) for t in targets)
    return False


def _positive_int(cfg: dict, key: str, path: Path) -> int:
    r = cfg.get(key)
    if type(r) is not int or r <= 0:
        raise AdapterFormatError(f"{path}: {key} must be a positive integer, got {r!r}")
    return r


def _read_shira(directory: Path, cfg: dict) -> dict[str, Any]:
    values, indices = _pairs(directory, cfg, ".shira_weight", ".shira_indices")
    # r is null only in directories written with save_adapter(..., strict=False): PEFT cannot load those
    r = None if cfg.get("r", 0) is None else _positive_int(cfg, "r", directory / CONFIG)
    where = directory / WEIGHTS
    out_idx, out_val = {}, {}
    for module, idx in indices.items():
        val = values[module]
        if idx.ndim != 2 or idx.shape[0] != 2 or val.ndim != 1 or val.size != idx.shape[1]:
            raise AdapterFormatError(
                f"{where}: {module}: shira_indices {list(idx.shape)} and shira_weight {list(val.shape)} "
                f"are not [2, N] and [N]"
            )
        if not safetensors_np.is_floating(val.dtype):
            raise AdapterFormatError(f"{where}: {module}: shira_weight has dtype {_dtype(val)}")
        if safetensors_np.is_floating(idx.dtype):  # some writers store indices as float
            f = idx.astype(np.float64)  # exact for every float dtype a file holds
            if not bool((f == np.round(f)).all()) or not bool(np.isfinite(f).all()):
                raise AdapterFormatError(f"{where}: {module}: shira_indices holds non-integer values")
        elif idx.dtype.kind in "bc":
            raise AdapterFormatError(f"{where}: {module}: shira_indices has dtype {_dtype(idx)}")
        with np.errstate(invalid="ignore"):  # a float past int64 wraps as torch's cast did: refused just below
            idx = idx.astype(np.int64)
        n = idx.shape[1]
        if n and int(idx.min()) < 0:
            raise AdapterFormatError(f"{where}: {module}: shira_indices holds negative values")
        if r is not None and (n % r or (n and int(idx[0].max()) + int(idx[1].max()) + 2 > n // r)):
            raise AdapterFormatError(
                f"{where}: {module}: {n} entries do not fit PEFT's r * (out + in) with r={r} and these indices"
            )
        if cfg.get("fan_in_fan_out"):
            idx = idx[::-1].copy()  # PEFT's delta is [out, in]; the base stores [in, out]
        out_idx[module + ".weight"], out_val[module + ".weight"] = idx, val
    mask = cfg.get("mask_type", "random")
    return {"indices": out_idx, "values": out_val, "scale": 1.0, "mask_kind": str(mask), "peft_r": r}


def _dtype(a: np.ndarray) -> str:
    """A dtype as messages have always named it (torch's name: ``torch.int16``)."""
    return safetensors_np.torch_name(a.dtype)


def _number(value: Any, what: str, path: Path) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise AdapterFormatError(f"{path}: {what} must be a finite number, got {value!r}")
    return float(value)


def _pattern(cfg: dict, key: str, path: Path) -> dict[str, Any]:
    patterns = cfg.get(key) or {}
    if not isinstance(patterns, dict):
        raise AdapterFormatError(f"{path}: {key} must be an object, got {patterns!r}")
    for p in patterns:
        try:
            re.compile(rf"(.*\.)?({p})$")
        except re.error as exc:
            raise AdapterFormatError(f"{path}: {key} key {p!r} is not a valid pattern ({exc})") from None
    return patterns


def _match(patterns: dict, module: str, default: Any) -> Any:
    for pattern, value in patterns.items():  # PEFT's rule (peft.utils.other.get_pattern_key)
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _read_lora(directory: Path, cfg: dict) -> dict[str, Any]:
    path = directory / CONFIG
    if cfg.get("use_dora"):
        raise AdapterFormatError(f"{path}: DoRA adapters are not supported")
    if cfg.get("lora_bias") or cfg.get("bias", "none") != "none":
        raise AdapterFormatError(f"{path}: LoRA adapters that train biases are not supported")
    alpha = _number(cfg.get("lora_alpha", 8), "lora_alpha", path)
    alphas, ranks = _pattern(cfg, "alpha_pattern", path), _pattern(cfg, "rank_pattern", path)
    r_default = _positive_int(cfg, "r", path) if "r" in cfg else None
    A, B = _pairs(directory, cfg, ".lora_A.weight", ".lora_B.weight")
    scaling = {}
    for module, a in A.items():
        rank = int(a.shape[0]) if a.ndim == 2 else 0
        want = _match(ranks, module, r_default)
        if rank <= 0 or (want is not None and rank != want):
            raise AdapterFormatError(
                f"{directory / WEIGHTS}: {module}.lora_A.weight has shape {list(a.shape)}; the config says rank {want}"
            )
        a_ = _number(_match(alphas, module, alpha), f"alpha for {module}", path)
        scaling[module + ".weight"] = a_ / math.sqrt(rank) if cfg.get("use_rslora") else a_ / rank
    return {
        "A": {m + ".weight": a for m, a in A.items()},
        "B": {m + ".weight": b for m, b in B.items()},
        "scaling": scaling,
        "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
    }


def write_shira(
    directory: str | Path, entries: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int | None, mask_kind: str
) -> Path:
    """A PEFT SHiRA directory from ``entries``: module path -> (``[2, N]`` int32 row/col, fp32 values);
    ``r=None`` when the counts fit no ``r`` (PEFT cannot load such a directory; this runtime can)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = {}
    for module, (rc, val) in entries.items():
        tensors[f"{PREFIX}{module}.shira_indices"] = rc
        tensors[f"{PREFIX}{module}.shira_weight"] = val
    config = {
        "peft_type": "SHIRA",
        "r": r,
        "mask_type": mask_kind,
        "target_modules": sorted(entries),
        "fan_in_fan_out": False,
        "init_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "random_seed": None,
        "base_model_name_or_path": None,
        "task_type": None,
    }
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(config, indent=2))
    return directory
