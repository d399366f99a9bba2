"""Seeded edits of a PEFT LoRA directory: ``adapter_config.json`` values and ``adapter_model.safetensors``.

PEFT writes no checksums, so only edits a correct reader must refuse (or read as the original) are made:
malformed or retyped config values, truncations, relabels to integer dtypes, NaN/Inf factors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.fuzz import mutations as mu
from tests.fuzz.adapter_cases import NONFINITE

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
LORA_CONFIG_EDITS: list[tuple[str, Any]] = [
    ("lora_alpha", "abc"),
    ("lora_alpha", None),
    ("lora_alpha", []),
    ("lora_alpha", {}),
    ("lora_alpha", "nan"),
    ("lora_alpha", "inf"),
    ("lora_alpha", float("nan")),  # json writes NaN / Infinity, which Python's json reads back
    ("lora_alpha", float("inf")),
    ("lora_alpha", True),
    ("alpha_pattern", {"(": 1}),
    ("alpha_pattern", {"[": 2}),
    ("alpha_pattern", "abc"),
    ("alpha_pattern", []),
    ("alpha_pattern", {"q_proj": "abc"}),
    ("alpha_pattern", {"q_proj": None}),
    ("alpha_pattern", None),
    ("r", "abc"),
    ("r", -1),
    ("r", 0),
    ("r", None),
    ("peft_type", "FOO"),
    ("peft_type", None),
    ("peft_type", 5),
    ("peft_type", ["LORA"]),
    ("use_dora", True),
    ("use_rslora", "false"),
    ("fan_in_fan_out", "false"),
    ("bias", "all"),
    ("target_modules", "abc"),
]


def lora_dir_edits(config: dict, weights: bytes) -> list[tuple[dict, str, Callable[[bytes], bytes]]]:
    """(params, file in the directory, bytes -> bytes) for every LoRA directory mutation."""
    out = []
    for key, value in LORA_CONFIG_EDITS:
        out.append(({"file": CONFIG, "field": key, "to": value}, CONFIG, mu.json_bytes(mu.set_path((key,), value))))
    out.append(
        (
            {"file": CONFIG, "field": "lora_alpha", "to": "same value as a string"},
            CONFIG,
            mu.json_bytes(mu.edit_path(("lora_alpha",), str)),
        )
    )
    for key in ("peft_type", "lora_alpha"):
        out.append(({"file": CONFIG, "field": key, "edit": "removed"}, CONFIG, mu.json_bytes(mu.del_path((key,)))))
    for text in (b"", b"[]", b"null", b"{", b"\xff\xfe"):
        out.append(({"file": CONFIG, "whole file": text.decode("latin-1")}, CONFIG, lambda raw, text=text: text))
    header, _ = mu.parse(weights)
    a_key = next(k for k in mu.tensor_keys(header) if k.endswith("lora_A.weight"))
    b_key = next(k for k in mu.tensor_keys(header) if k.endswith("lora_B.weight"))
    end = mu.header_end(weights)
    for length in (0, 8, end - 1, end, len(weights) - 1):
        out.append(({"file": WEIGHTS, "op": "truncate", "length": length}, WEIGHTS, mu.truncate(length)))
    out.append(({"file": WEIGHTS, "op": "header length", "value": 2**63}, WEIGHTS, mu.set_header_length(2**63)))
    for d in ("I32", "U32"):
        edit = mu.edit_header(mu.set_entry(a_key, "dtype", d))
        out.append(({"file": WEIGHTS, "op": "relabel dtype", "tensor": a_key, "to": d}, WEIGHTS, edit))
    for key, kind in ((b_key, "nan"), (a_key, "inf"), (b_key, "-inf")):
        edit = mu.edit_file(mu.write_element(key, 3, NONFINITE["F32"][kind]))
        out.append(({"file": WEIGHTS, "op": f"write {kind}", "tensor": key, "index": 3}, WEIGHTS, edit))
    out.append(
        (
            {"file": WEIGHTS, "op": "swap tensor names", "tensors": [a_key, b_key]},
            WEIGHTS,
            mu.edit_header(mu.swap_entries(a_key, b_key)),
        )
    )
    return out
