"""Base fingerprints: catch an adapter made for another base, including a same-shaped base with other weights.

A fingerprint has two parts:
- ``structure``: a hash of the names and shapes of the tensors the adapter touches (dtype is left out, so an
  adapter made on the fp32 base applies to its bf16 copy);
- ``probes``: per tensor, the base values (fp32) at the adapter's first ``PROBES`` indices. They are compared
  with a tolerance that a 16-bit copy of the same base passes and another base's weights do not.

On a quantized base (``shira_runtime.quantization``) the probes are compared with the dequantized codes, allowing each
probe the grid's half step at its code on top (``check``'s ``slack``): an adapter made on the fp32 model applies
to its INT8/FP8 copy, still not to another model of the same shapes.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from shira_runtime.arrays import NUMPY, as_ops, ops_for
from shira_runtime.errors import BaseMismatchError

PROBES = 16
RTOL = 1e-2  # bf16 keeps ~3 significant digits: a bf16 copy of the base stays well inside this


def structure_hash(shapes: dict[str, tuple[int, ...]]) -> str:
    items = sorted((name, list(shape)) for name, shape in shapes.items())
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:32]


@dataclass
class Fingerprint:
    structure: str
    probes: dict[str, Any] = field(default_factory=dict)  # name -> fp32 [<=PROBES] (numpy or torch)

    @staticmethod
    def of(base: dict[str, Any], indices: dict[str, Any]) -> Fingerprint:
        """The fingerprint of ``base`` (name -> base tensor or array) for an adapter with these sorted flat
        ``indices``; the probes are of the base's kind."""
        shapes = {n: tuple(base[n].shape) for n in indices}
        probes = {}
        for n, idx in indices.items():
            w = base[n].detach() if hasattr(base[n], "detach") else base[n]
            ops = ops_for(w)
            probes[n] = ops.to_fp32(ops.take(w, as_ops(idx[:PROBES], ops)))
        return Fingerprint(structure_hash(shapes), probes)

    def check(
        self,
        adapter: str,
        shapes: dict[str, tuple[int, ...]],
        base_values: dict[str, Any],
        slack: dict[str, Any] | None = None,
    ) -> None:
        """Raise ``BaseMismatchError`` unless ``shapes``/``base_values`` are those of the recorded base.
        ``slack``: per tensor, an extra absolute tolerance per probe (a quantized base's half grid step)."""
        if structure_hash(shapes) != self.structure:
            raise BaseMismatchError(
                f"adapter {adapter!r} was made for another base: the names/shapes of the tensors it touches "
                f"differ from this model's (structure hash {structure_hash(shapes)} != {self.structure})"
            )
        for name, want in self.probes.items():  # compared as fp32 numpy arrays, whatever kind they came as
            want = _fp32(want)
            got = _fp32(base_values[name][: want.size])
            atol = np.float32(1e-3) * np.abs(want).max() if want.size else np.float32(0.0)
            if not math.isfinite(atol):
                raise BaseMismatchError(f"adapter {adapter!r}: tensor {name!r}: the fingerprint's probe is not finite")
            extra = slack.get(name) if slack else None
            close = got.shape == want.shape
            if close:
                bound = atol + np.float32(RTOL) * np.abs(want)
                if extra is not None:
                    bound = bound + _fp32(extra[: want.size])
                close = bool((np.abs(got - want) <= bound).all())
            if not close:
                raise BaseMismatchError(
                    f"adapter {adapter!r} was made for another base: tensor {name!r} has other weights at the "
                    f"adapter's indices (same shapes, different values)"
                )

    # -- serialisation (safetensors metadata is str -> str; probes travel as tensors) --
    def to_meta(self) -> str:
        return json.dumps({"structure": self.structure, "probes": sorted(self.probes)})

    @staticmethod
    def from_meta(meta: str, tensors: dict[str, Any]) -> Fingerprint:
        d = json.loads(meta)
        return Fingerprint(d["structure"], {n: tensors[n] for n in d["probes"]})


def codes_base_hash(fmt: str, shape: tuple[int, ...], scales: Any, base_codes: Any) -> str:
    """What an adapter of codes (``shira_runtime.adapters.CodesAdapter``) records of the quantized base it was baked
    for,
    per tensor: sha256 of the format, the shape, every per-row scale and the base codes at the adapter's indices.
    Another format, other scales (another weight's rows) or other codes under the adapter give another hash."""
    h = hashlib.sha256(json.dumps([fmt, list(shape)]).encode())
    h.update(_fp32(scales).tobytes())
    h.update(np.ascontiguousarray(as_ops(base_codes, NUMPY)).view(np.uint8).tobytes())
    return h.hexdigest()[:32]


def _fp32(x: Any) -> np.ndarray:
    """``x`` (numpy or torch) as a contiguous fp32 numpy array."""
    return np.ascontiguousarray(as_ops(x.detach() if hasattr(x, "detach") else x, NUMPY), dtype=np.float32)
