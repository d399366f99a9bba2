"""The training loop and the greedy exact-match accuracy that ``benchmarks.fusion`` and ``benchmarks.real_tasks``
share (the toy model's tasks and the real model's alike)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from benchmarks.fusion_tasks import EOS, EvalSet


def train(model: nn.Module, params: Sequence[torch.Tensor], sampler: Any, steps: int, lr: float, batch: int) -> float:
    """``steps`` AdamW steps (one-cycle schedule) of the answer loss on ``sampler``'s batches (``.batch(n)`` gives
    ``(ids, labels)``); the final loss."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        ids, labels = sampler.batch(batch)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach())


def accuracy(generate: Callable[..., torch.Tensor], ev: EvalSet, eos: int = EOS) -> tuple[float, float]:
    """Greedy answers' exact-match accuracy (every answer token right) and token accuracy (answer positions
    right): ``generate(prompts, max_new_tokens=m)`` returns prompt + new tokens."""
    with torch.no_grad():
        mask = torch.ones_like(ev.prompts)  # no padding: every prompt of a set has the same length
        out = generate(ev.prompts, max_new_tokens=ev.answers.shape[1], eos_token_id=eos, attention_mask=mask)
    p, m = ev.prompts.shape[1], ev.answers.shape[1]
    new = torch.full_like(ev.answers, -1)
    got = out[:, p : p + m]
    new[:, : got.shape[1]] = got  # rows that all ended early (EOS) leave -1: wrong
    right = new == ev.answers
    return float(right.all(1).float().mean()), float(right.float().mean())
