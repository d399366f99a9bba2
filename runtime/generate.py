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
import torch
from shira_runtime.errors import CannotGenerateError, ShiraError


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the last position's logits."""

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

    def pick(self, logits: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """Next token ids ``[B]`` from ``logits`` ``[B, V]``."""
        if not self.do_sample:
            return logits.argmax(-1)
        scores = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            ordered, order = torch.sort(scores, descending=True, dim=-1)
            before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # mass ranked above each token
            drop = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, before >= self.top_p)
            scores = scores.masked_fill(drop, float("-inf"))  # the top token always stays (its "before" is 0)
        return torch.multinomial(scores.softmax(-1), 1, generator=gen).squeeze(-1)


class _Picker:
    """The per-step choice shared by both loops: sample or argmax, then finished rows repeat the padding token."""

    def __init__(self, sampling: Sampling, batch: int, eos_token_id, pad_token_id) -> None:
        self.sampling = sampling
        self.gen = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        self.eos = torch.tensor([] if eos_token_id is None else np.atleast_1d(eos_token_id).tolist(), dtype=torch.long)
        self.pad = pad_token_id if pad_token_id is not None else (int(self.eos[0]) if self.eos.numel() else 0)
        self.done = torch.zeros(batch, dtype=torch.bool)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        nxt = self.sampling.pick(logits, self.gen)
        if self.eos.numel():
            nxt = torch.where(self.done, self.pad, nxt)  # finished rows repeat the padding token, as transformers
            self.done |= torch.isin(nxt, self.eos)
        return nxt

    @property
    def finished(self) -> bool:
        return bool(self.eos.numel()) and bool(self.done.all())


def loop(
    forward: Callable[[torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Generate with ``forward(ids [B, S]) -> logits [B, S, V]`` re-run on the whole sequence every step."""
    pick = _Picker(sampling, input_ids.shape[0], eos_token_id, pad_token_id)
    ids = input_ids
    for _ in range(max_new_tokens):
        nxt = pick(torch.as_tensor(forward(ids))[:, -1, :])
        ids = torch.cat([ids, nxt[:, None].to(ids.dtype)], dim=1)
        if pick.finished:
            break
    return ids


def checked_logits(
    forward: Callable[[torch.Tensor], Any], what: str, hint: str = ""
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``forward`` as ``loop`` takes it: ids ``[B, S]`` -> logits ``[B, S, V]``, read from a tensor, an array, the
    first of several outputs, or ``.logits``. The first call is checked: a forward that fails on token ids or
    returns anything but floating logits ``[B, S, V]`` raises ``CannotGenerateError`` naming ``what`` and what
    it lacks, then ``hint`` (later steps run unchecked)."""
    checked = False

    def step(ids: torch.Tensor) -> torch.Tensor:
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
        if logits is None or not logits.is_floating_point() or logits.dim() != 3 or logits.shape[:2] != ids.shape:
            raise CannotGenerateError(f"{what} cannot generate: its forward returned {_describe(out)}; {need}")
        checked = True
        return logits

    return step


def _logits(out: Any) -> torch.Tensor:
    """The logits of one forward: a tensor, an array, the first of several outputs, or ``.logits``."""
    out = getattr(out, "logits", out)
    if isinstance(out, (list, tuple)):
        out = out[0]
    return torch.as_tensor(out)


def _describe(out: Any) -> str:
    if isinstance(out, (torch.Tensor, np.ndarray)):
        return f"a {out.dtype} tensor of shape {list(out.shape)}"
    if callable(getattr(out, "keys", None)):  # transformers' ModelOutput, a dict
        return f"{type(out).__name__} with {list(out.keys())} and no 'logits'"
    return f"a {type(out).__name__}"


def cached_loop(
    step: Callable[[np.ndarray, np.ndarray, Any], tuple[np.ndarray, Any]],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: int,
    sampling: Sampling,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Generate with ``step(ids [B, S], mask [B, past + S], cache) -> (last position's logits [B, V], cache)``:
    the prompt once (``cache`` None), then one token per step. Prompts are padded on the left (mask 0)."""
    pick = _Picker(sampling, input_ids.shape[0], eos_token_id, pad_token_id)
    mask = (attention_mask if attention_mask is not None else torch.ones_like(input_ids)).numpy().astype(np.int64)
    ids, new, cache = input_ids.numpy(), [], None
    for _ in range(max_new_tokens):
        logits, cache = step(ids, mask, cache)
        nxt = pick(torch.from_numpy(np.asarray(logits)))
        new.append(nxt)
        if pick.finished:
            break
        ids = nxt[:, None].numpy().astype(np.int64)
        mask = np.concatenate([mask, np.ones((mask.shape[0], 1), np.int64)], axis=1)
    if not new:
        return input_ids
    return torch.cat([input_ids, torch.stack(new, 1).to(input_ids.dtype)], dim=1)


def check_ids(input_ids: object, attention_mask: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``input_ids`` as a ``[B, S]`` int64 tensor (numpy accepted), and the mask the same way."""
    ids = _tensor(input_ids)
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


def _tensor(x: object) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
