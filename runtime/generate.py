"""Token-by-token generation over whatever adapter is active: greedy, or sampling with temperature, top-k,
top-p and a seed; stops at ``eos_token_id``. Returns the prompt followed by the new tokens, like transformers'
``generate`` (``[batch, prompt + new]``).

A transformers model on the torch backend runs its own ``generate`` (its KV cache, its attention masks). A bundle
exported with its KV cache runs ``cached_loop``: a prefill over the (left-padded) prompts, then one-token steps
that pass the cache on. Any other decoder runs ``loop``: each step re-runs the whole sequence and takes the last
position's logits, so a batch must hold prompts of one length (no padding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from shira_runtime.errors import CannotGenerateError, ShiraError


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the last position's logits.

    The runtime's own loops (``loop``, ``cached_loop``) choose in numpy, on every backend, with or without
    torch: greedy is the first maximum; sampling draws from numpy's PCG64 seeded with ``seed``, so one seed gives
    the same tokens on the torch backend, a bundle with torch and a bundle on a device without it. (A
    transformers model on the torch backend samples with its own ``generate`` and torch's generator.)"""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def pick(self, logits: np.ndarray, gen: np.random.Generator | None) -> np.ndarray:
        """Next token ids ``[B]`` (int64) from ``logits`` ``[B, V]``."""
        if not self.do_sample:
            return logits.argmax(-1).astype(np.int64)
        scores = logits.astype(np.float32) / np.float32(self.temperature)
        vocab = scores.shape[-1]
        if self.top_k is not None and self.top_k < vocab:
            kth = np.partition(scores, vocab - self.top_k, axis=-1)[:, vocab - self.top_k : vocab - self.top_k + 1]
            scores = np.where(scores < kth, np.float32(-np.inf), scores)
        if self.top_p is not None and self.top_p < 1:
            order = np.argsort(-scores, axis=-1, kind="stable")
            probs = _softmax(np.take_along_axis(scores, order, -1))
            before = np.cumsum(probs, -1) - probs  # mass ranked above each token: the top token's is 0, it stays
            drop = np.zeros_like(scores, dtype=bool)
            np.put_along_axis(drop, order, before >= self.top_p, -1)
            scores = np.where(drop, np.float32(-np.inf), scores)
        gen = gen if gen is not None else np.random.default_rng()
        cdf = np.cumsum(_softmax(scores).astype(np.float64), -1)
        draw = gen.random(scores.shape[0]) * cdf[:, -1]
        nxt = np.array([np.searchsorted(c, u, side="right") for c, u in zip(cdf, draw)], dtype=np.int64)
        return np.minimum(nxt, vocab - 1)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


class _Picker:
    """The per-step choice shared by both loops: sample or argmax, then finished rows repeat the padding token."""

    def __init__(self, sampling: Sampling, batch: int, eos_token_id, pad_token_id) -> None:
        self.sampling = sampling
        self.gen = np.random.default_rng(sampling.seed) if sampling.seed is not None else None
        self.eos = np.array([] if eos_token_id is None else np.atleast_1d(eos_token_id).tolist(), dtype=np.int64)
        self.pad = pad_token_id if pad_token_id is not None else (int(self.eos[0]) if self.eos.size else 0)
        self.done = np.zeros(batch, dtype=bool)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        nxt = self.sampling.pick(np.asarray(logits), self.gen)
        if self.eos.size:
            nxt = np.where(self.done, self.pad, nxt)  # finished rows repeat the padding token, as transformers
            self.done |= np.isin(nxt, self.eos)
        return nxt

    @property
    def finished(self) -> bool:
        return bool(self.eos.size) and bool(self.done.all())


def loop(
    forward: Callable[[Any], Any],
    input_ids: Any,
    max_new_tokens: int,
    sampling: Sampling,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> Any:
    """Generate with ``forward(ids [B, S]) -> logits [B, S, V]`` re-run on the whole sequence every step; ``ids``
    and the result are of ``input_ids``' kind (a torch tensor or a numpy array)."""
    pick = _Picker(sampling, input_ids.shape[0], eos_token_id, pad_token_id)
    ids = input_ids
    for _ in range(max_new_tokens):
        nxt = pick(_numpy(forward(ids))[:, -1, :])
        ids = _append(ids, nxt)
        if pick.finished:
            break
    return ids


def _numpy(x: Any) -> np.ndarray:
    """Logits as numpy (a torch tensor through fp32 when it is a 16-bit one numpy cannot hold)."""
    if isinstance(x, np.ndarray):
        return x
    if str(x.dtype) == "torch.bfloat16":
        x = x.float()
    return x.detach().cpu().numpy()


def _append(ids: Any, nxt: np.ndarray) -> Any:
    if isinstance(ids, np.ndarray):
        return np.concatenate([ids, nxt[:, None].astype(ids.dtype)], axis=1)
    import torch

    return torch.cat([ids, torch.from_numpy(nxt)[:, None].to(ids.dtype)], dim=1)


def checked_logits(
    forward: Callable[[Any], Any], what: str, hint: str = ""
) -> Callable[[Any], Any]:
    """``forward`` as ``loop`` takes it: ids ``[B, S]`` -> logits ``[B, S, V]``, read from a tensor, an array, the
    first of several outputs, or ``.logits``. The first call is checked: a forward that fails on token ids or
    returns anything but floating logits ``[B, S, V]`` raises ``CannotGenerateError`` naming ``what`` and what
    it lacks, then ``hint`` (later steps run unchecked)."""
    checked = False

    def step(ids: Any) -> Any:
        nonlocal checked
        if checked:
            return _logits(forward(ids))
        need = f"generating needs forward(input_ids int64 {list(ids.shape)}) -> logits [batch, seq, vocab]{hint}"
        try:
            out = forward(ids)
        except ShiraError:
            raise
        except (TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise CannotGenerateError(
                f"{what} cannot generate: its forward fails on token ids ({type(exc).__name__}: {exc}); {need}"
            ) from exc
        try:
            logits = _logits(out)
        except (TypeError, ValueError, RuntimeError):
            logits = None
        if logits is None or not _floating(logits) or logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
            raise CannotGenerateError(f"{what} cannot generate: its forward returned {_describe(out)}; {need}")
        checked = True
        return logits

    return step


def _logits(out: Any) -> Any:
    """The logits of one forward: a tensor, an array, the first of several outputs, or ``.logits``."""
    out = getattr(out, "logits", out)
    if isinstance(out, (list, tuple)):
        out = out[0]
    if isinstance(out, np.ndarray) or hasattr(out, "is_floating_point"):
        return out
    return np.asarray(out)


def _floating(x: Any) -> bool:
    if isinstance(x, np.ndarray):
        return x.dtype.kind == "f" or x.dtype.name == "bfloat16"
    return bool(x.is_floating_point())


def _describe(out: Any) -> str:
    if isinstance(out, np.ndarray) or hasattr(out, "is_floating_point"):
        return f"a {out.dtype} tensor of shape {list(out.shape)}"
    if callable(getattr(out, "keys", None)):  # transformers' ModelOutput, a dict
        return f"{type(out).__name__} with {list(out.keys())} and no 'logits'"
    return f"a {type(out).__name__}"


def cached_loop(
    step: Callable[[np.ndarray, np.ndarray, Any], tuple[np.ndarray, Any]],
    input_ids: Any,
    attention_mask: Any,
    max_new_tokens: int,
    sampling: Sampling,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> Any:
    """Generate with ``step(ids [B, S], mask [B, past + S], cache) -> (last position's logits [B, V], cache)``:
    the prompt once (``cache`` None), then one token per step. Prompts are padded on the left (mask 0). numpy
    throughout; the result is of ``input_ids``' kind (a torch tensor or a numpy array)."""
    prompt = _numpy(input_ids).astype(np.int64)
    pick = _Picker(sampling, prompt.shape[0], eos_token_id, pad_token_id)
    mask = _numpy(attention_mask).astype(np.int64) if attention_mask is not None else np.ones_like(prompt)
    ids, new, cache = prompt, [], None
    for _ in range(max_new_tokens):
        logits, cache = step(ids, mask, cache)
        nxt = pick(logits)
        new.append(nxt)
        if pick.finished:
            break
        ids = nxt[:, None]
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
    out = np.concatenate([prompt, np.stack(new, 1)], axis=1) if new else prompt
    if isinstance(input_ids, np.ndarray):
        return out.astype(input_ids.dtype)
    import torch

    return torch.from_numpy(out).to(input_ids.dtype)


def check_ids(input_ids: object, attention_mask: object, as_torch: bool = False) -> tuple[Any, Any]:
    """``input_ids`` as ``[B, S]`` int64 (1-D taken as one row), and the mask the same way: torch tensors when
    ``input_ids`` is one or ``as_torch`` (the torch backend), else numpy arrays (a bundle given numpy ids or lists:
    torch is not imported, installed or not). ``generate`` returns the same kind."""
    if not (as_torch or type(input_ids).__module__.partition(".")[0] == "torch"):
        return _check_ids_np(input_ids, attention_mask)
    import torch
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.as_tensor(np.asarray(input_ids))
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be integer token ids [batch, seq], got {ids.dtype}{list(ids.shape)}")
    mask = None
    if attention_mask is not None:
        mask = torch.as_tensor(
            np.asarray(attention_mask) if not isinstance(attention_mask, torch.Tensor) else attention_mask
        )
        mask = mask[None] if mask.dim() == 1 else mask
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {list(mask.shape)} does not match input_ids {list(ids.shape)}")
    return ids.long(), mask


def _check_ids_np(input_ids: object, attention_mask: object) -> tuple[np.ndarray, np.ndarray | None]:
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be integer token ids [batch, seq], got {ids.dtype}{list(ids.shape)}")
    mask = None
    if attention_mask is not None:
        mask = np.asarray(attention_mask)
        mask = mask[None] if mask.ndim == 1 else mask
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {list(mask.shape)} does not match input_ids {list(ids.shape)}")
    return ids.astype(np.int64), mask


