"""SHiRA masks: which ``r * (out + in)`` positions of each ``nn.Linear`` weight an adapter trains (arXiv 2406.13175).

``shira_mask_fn(kind, ...)`` returns a callable with PEFT's mask signature ``mask_fn(base_layer, r, **kwargs)``::

    config = ShiraConfig(r=32, target_modules=["q_proj", "v_proj"], mask_type="snip")  # a label (PEFT warns)
    config.mask_fn = shira_mask_fn("snip", model, batch)    # gradients: one forward/backward, now
    peft_model = get_peft_model(model, config)

Kinds (the paper's sec. 3.1 and appendix B): ``struct`` (rows, columns and a diagonal), ``rand``, ``wm`` (largest
``|w|``), ``grad`` (largest ``|dL/dw|``), ``snip`` (largest ``|w * dL/dw|``) and ``block`` (whole 64-byte runs).
Ties are broken by a generator seeded from ``seed`` and the layer (shape, dtype, weights): a mask is reproducible
and two layers of one model get different random picks unless their weights are equal.

Non-overlapping adapters (the paper's second fusion variant): pass the earlier mask functions as ``exclude``.
A mask function memoizes its masks by module, and computes one on demand when a later function asks for it::

    fns = shira_masks("snip", 3, model, batch, overlap=False, targets=["q_proj", "v_proj"])
    configs = [ShiraConfig(r=32, target_modules=["q_proj", "v_proj"]) for _ in fns]
    for config, fn in zip(configs, fns):
        config.mask_fn = fn     # by hand: a = shira_mask_fn("rand"); b = shira_mask_fn("rand", seed=1, exclude=[a])
    peft_model = get_peft_model(model, configs[0], adapter_name="a0")
    peft_model.add_adapter("a1", configs[1])     # PEFT passes the same base layers: masks disjoint from a0's
    peft_model.add_adapter("a2", configs[2])

``exclude`` also takes ``{module or weight: mask}`` mappings (masks of adapters made elsewhere), or a list mixing
both. For our own adapters, ``fn.indices(model, targets, r)`` gives the flat indices of ``SparseAdapter``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

KINDS = ("struct", "rand", "wm", "grad", "snip", "block")
CACHE_LINE_BYTES = 64
_NEEDS_GRADIENTS = ("grad", "snip")

Batch = Mapping[str, torch.Tensor] | torch.Tensor
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def mask_indices(mask: torch.Tensor) -> torch.Tensor:
    """Flat row-major indices of the ones of a 0/1 ``mask``, sorted, on the CPU: ``SparseAdapter``'s layout
    (int32, int64 past 2**31 elements)."""
    flat = mask.detach().reshape(-1)
    bad = (flat != 0) & (flat != 1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"mask_indices: the mask holds {float(flat[i])} at flat index {i}; expected only 0 and 1")
    idx = flat.nonzero().squeeze(1).cpu()
    return idx.to(torch.int32 if flat.numel() < 2**31 else torch.int64)


def random_indices(numel: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``k`` distinct flat indices in ``[0, numel)``, sorted, int32/int64, without an O(numel) permutation."""
    k = min(k, numel)
    if k * 4 > numel:
        idx = torch.randperm(numel, generator=gen)[:k]
    else:
        idx = torch.empty(0, dtype=torch.int64)
        while idx.numel() < k:
            draw = torch.randint(numel, (int((k - idx.numel()) * 1.1) + 16,), generator=gen)
            idx = torch.unique(torch.cat([idx, draw]))
        idx = idx[torch.randperm(idx.numel(), generator=gen)[:k]]
    return idx.sort().values.to(torch.int32 if numel < 2**31 else torch.int64)


class _Scores:
    """Per-module gradient scores (``|g|`` or ``|w * g|``, fp32) shared by ``consumers`` mask functions; a
    module's score is dropped once every consumer has made its mask (it is as large as the weight, in fp32)."""

    def __init__(self, scores: dict[nn.Module, torch.Tensor | None], names: dict[nn.Module, str], consumers: int):
        self.scores, self.names, self.consumers = scores, names, consumers
        self.targets = [names.get(m, repr(m)) for m in scores]
        self.used: dict[nn.Module, set[int]] = {}

    def take(self, module: nn.Module, consumer: object, where: str) -> torch.Tensor:
        if module not in self.scores:
            if module in self.used:
                raise ValueError(f"{where}: its gradient scores were freed after its first mask (one r per layer)")
            if module in self.names:
                some = ", ".join(self.targets[:6]) + (", ..." if len(self.targets) > 6 else "")
                raise ValueError(f"{where}: gradients were computed only for the targets ({some})")
            raise ValueError(f"{where}: not a module of the model the gradients were computed on")
        score = self.scores[module]
        if score is None:
            raise ValueError(f"{where}: the loss does not depend on its weight (no gradient)")
        self.used.setdefault(module, set()).add(id(consumer))
        if len(self.used[module]) >= self.consumers:
            del self.scores[module]
        return score


class ShiraMaskFn:
    """A SHiRA mask function (PEFT's ``mask_fn``): ``fn(base_layer, r)`` is a 0/1 mask of the weight's shape,
    dtype and device with exactly ``r * (out + in)`` ones. Masks are memoized by module (as flat indices).
    Made by ``shira_mask_fn``; PEFT's keyword arguments (``bias``, ``random_seed``) are ignored."""

    def __init__(
        self,
        kind: str,
        seed: int,
        exclude: list[Any],
        scores: _Scores | None,
        names: dict[nn.Module, str],
        line_dtype: torch.dtype | None = None,
        transposed: bool = False,
    ):
        self.kind, self.seed, self.exclude, self._scores, self._names = kind, seed, exclude, scores, names
        self.line_dtype, self.transposed = line_dtype, transposed
        self._memo: dict[nn.Module, tuple[int, torch.Tensor]] = {}  # module -> (r, sorted flat indices)

    def __repr__(self) -> str:
        return f"ShiraMaskFn({self.kind!r}, seed={self.seed}, {len(self._memo)} layers masked)"

    def __deepcopy__(self, memo: dict) -> ShiraMaskFn:
        return self  # shared, not copied: its masks and scores are keyed by the module objects of one model

    def __call__(self, base_layer: nn.Module, r: int, **kwargs: Any) -> torch.Tensor:
        w = base_layer.weight
        mask = torch.zeros(w.numel(), dtype=w.dtype, device=w.device)
        mask[self.flat(base_layer, r).to(w.device)] = 1
        return mask.view(w.shape)

    def flat(self, base_layer: nn.Module, r: int) -> torch.Tensor:
        """The mask of ``base_layer`` as sorted flat indices (int64, on the weight's device)."""
        if base_layer in self._memo and self._memo[base_layer][0] == r:
            return self._memo[base_layer][1]
        where = f"shira_mask_fn({self.kind!r}): layer {self._describe(base_layer)}"
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{where}: SHiRA masks are for nn.Linear layers, got {type(base_layer).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"{where}: r must be a positive int, got {r!r}")
        w = base_layer.weight.detach()
        out, inn = w.shape
        k = r * (out + inn)
        banned = self._banned(base_layer, r, where) if self.exclude else None  # None: nothing excluded
        free = w.numel() - (int(banned.sum()) if banned is not None else 0)
        if k > free:
            left = f"the weight has {free}" if free == w.numel() else f"only {free} remain outside the excluded masks"
            raise ValueError(f"{where}: r={r} needs r * (out + in) = {k} positions, {left}")
        gen = torch.Generator().manual_seed(_layer_seed(self.seed, w))
        if self.kind == "rand":  # every free position equally likely: sample, no score to rank
            if banned is None:
                idx = random_indices(w.numel(), k, gen).long().to(w.device)
            else:
                allowed = (~banned).reshape(-1).nonzero().squeeze(1)
                idx = allowed[random_indices(allowed.numel(), k, gen).long().to(w.device)]
            self._memo[base_layer] = (r, idx)
            return idx
        if self._scores is not None:  # grad, snip, SNIP-scored block
            score = self._scores.take(base_layer, self, where).to(w.device)
            if not bool(torch.isfinite(score).all()):
                raise ValueError(f"{where}: its gradient scores are not all finite (NaN/Inf gradient)")
        elif self.kind == "wm":
            score = w.float().abs()
        elif self.kind == "struct":
            score = _struct_score(out, inn, r, self.seed, w.device)
        else:  # random blocks: no score
            score = None
        if banned is None:
            banned = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
        if self.kind == "block":
            run = block_elements(self.line_dtype if self.line_dtype is not None else w.dtype)
            if self.transposed:  # lines of the [in, out] storage: runs of rows in one column, mapped back
                t = _block(None if score is None else score.t().contiguous(), banned.t().contiguous(), k, run, gen)
                idx = ((t % out) * inn + t // out).sort().values
            else:
                idx = _block(score, banned, k, run, gen)
        else:
            idx = _top_k(score.masked_fill(banned, float("-inf")).reshape(-1), k, gen)
        self._memo[base_layer] = (r, idx)
        return idx

    def indices(self, model: nn.Module, targets: Iterable[str], r: int) -> dict[str, torch.Tensor]:
        """Masks of the ``nn.Linear`` layers of ``model`` named by ``targets`` (PEFT's rule: the name or its
        dotted suffix) as ``SparseAdapter.indices``: ``{"<name>.weight": sorted flat indices}`` on the CPU."""
        return {f"{name}.weight": mask_indices(self(m, r)) for name, m in _target_linears(model, targets).items()}

    def _banned(self, base_layer: nn.Module, r: int, where: str) -> torch.Tensor:
        w = base_layer.weight
        banned = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
        for source in self.exclude:
            if isinstance(source, ShiraMaskFn):
                banned.view(-1)[source.flat(base_layer, r).to(w.device)] = True
                continue
            mask = source.get(base_layer)
            mask = source.get(w) if mask is None else mask
            if mask is None:
                continue
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(w.shape):
                got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"{where}: an excluded mask has shape {got}, the weight has {tuple(w.shape)}")
            banned |= mask.to(w.device) != 0
        return banned

    def _describe(self, module: nn.Module) -> str:
        name = self._names.get(module)
        return f"{name!r} ({module})" if name is not None else repr(module)


def shira_mask_fn(
    kind: str,
    model: nn.Module | None = None,
    batch: Batch | None = None,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    exclude: Any = None,
    targets: Iterable[str] | None = None,
    line_dtype: torch.dtype | str | None = None,
    transposed: bool = False,
) -> ShiraMaskFn:
    """A SHiRA mask function of ``kind`` (one of ``KINDS``), usable as PEFT's ``ShiraConfig.mask_fn``.

    ``grad`` and ``snip`` need ``model`` and ``batch`` (a dict of model inputs or a tensor of input ids); so does
    ``block`` for SNIP-scored blocks (without both, its blocks are random). The gradients are computed here, once
    for the ``nn.Linear`` layers named by ``targets`` (PEFT's ``target_modules``; None: all), in fp32, and their
    scores are held (fp32, the weights' size) until each layer's mask is made. The mask function must then be
    called on these module objects (PEFT does: not on a deep copy). The default loss is next-token cross-entropy
    of the model's logits against the input ids (padding masked); ``loss_fn(model, batch) -> scalar`` replaces it.
    ``struct``: ``r`` rows and ``r`` columns at strides ``out // r`` and ``in // r`` plus a diagonal, all shifted
    by ``seed``; to make the count exact, random row/column positions (never diagonal ones) are dropped or random
    other positions added. ``block``: whole cache lines of the weight's dtype (16 fp32 or 32 bf16/fp16 elements)
    aligned within each row (a row's last block is shorter when ``in`` is not a multiple), best summed score
    first; the count is exact: the best positions of the next block fill the remainder. ``line_dtype``: the
    storage the blocks are lines of, when the adapter will be switched on a base of another dtype than the
    weights it is made on (``torch.int8`` / ``"int8"`` for an int8 or fp8 base: 64 elements per block; None: the
    weight's own dtype). Any mask is valid on any base of the same shapes: blocks made for fp32 (16 elements) on
    an int8 base are quarter lines (the switch touches a line per block, not per four), and blocks made for int8
    are four whole lines of fp32 (as good on fp32 as fp32's own). ``transposed``: the blocks are lines of the
    weight stored transposed, ``[in, out]``: runs of consecutive rows in one column, aligned within columns. That
    is how an int8 bundle stores its weights (the uint8 copy its graph reads and its switch writes), so masks for
    an int8 bundle take ``line_dtype="int8", transposed=True``; on a base stored ``[out, in]`` such blocks touch a
    line per element, as random positions do. ``exclude``: positions never chosen (see the module docstring).
    """
    fns = shira_masks(
        kind, 1, model, batch, loss_fn, seed, exclude=exclude, targets=targets, line_dtype=line_dtype,
        transposed=transposed,
    )  # fmt: skip
    return fns[0]


def shira_masks(
    kind: str,
    n: int,
    model: nn.Module | None = None,
    batch: Batch | Sequence[Batch] | None = None,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    overlap: bool = True,
    exclude: Any = None,
    targets: Iterable[str] | None = None,
    line_dtype: torch.dtype | str | None = None,
    transposed: bool = False,
) -> list[ShiraMaskFn]:
    """``n`` mask functions with seeds ``seed, seed + 1, ...``, for ``n`` adapters to be fused (the paper's two
    variants): ``overlap=False`` makes each exclude the masks of all earlier ones, so the ``n`` masks are disjoint.

    ``batch``: one batch (gradients computed once, shared: ``wm``/``grad``/``snip`` then give ``n`` equal masks
    when overlapping) or a list of ``n`` batches, one per adapter's task. Other arguments as ``shira_mask_fn``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown SHiRA mask kind {kind!r}; the kinds are {', '.join(KINDS)}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"shira_masks: n must be a positive int, got {n!r}")
    scored = kind in _NEEDS_GRADIENTS or (kind == "block" and (model is not None or batch is not None))
    if scored and (model is None or batch is None):
        need = "model and batch" if kind in _NEEDS_GRADIENTS else "both model and batch (SNIP blocks) or neither"
        given = ", ".join(f"{k}={'given' if v is not None else None}" for k, v in (("model", model), ("batch", batch)))
        raise ValueError(f"SHiRA mask kind {kind!r} needs {need}; got {given}")
    if not scored and (batch is not None or loss_fn is not None):
        raise ValueError(f"SHiRA mask kind {kind!r} uses no batch or loss_fn (only grad, snip and block do)")
    if line_dtype is not None:
        line_dtype = _line_dtype(line_dtype)
        if kind != "block":
            raise ValueError(f"SHiRA mask kind {kind!r} takes no line_dtype (only block masks are made of lines)")
    if transposed and kind != "block":
        raise ValueError(f"SHiRA mask kind {kind!r} takes no transposed (only block masks are made of lines)")
    earlier = _exclusions(exclude)
    batches = list(batch) if isinstance(batch, (list, tuple)) else [batch] * n
    if len(batches) != n:
        raise ValueError(f"shira_masks: {len(batches)} batches for n={n} adapters")
    names = {} if model is None else {m: name for name, m in model.named_modules()}
    same = all(b is batches[0] for b in batches)
    fns: list[ShiraMaskFn] = []
    scores = None
    for i in range(n):
        if scored and (scores is None or not same):
            kind_score = "grad" if kind == "grad" else "snip"
            scores = _Scores(_gradient_scores(model, batches[i], loss_fn, targets, kind_score), names, n if same else 1)
        excluded = earlier + ([] if overlap else list(fns))
        fns.append(ShiraMaskFn(kind, seed + i, excluded, scores, names, line_dtype, bool(transposed)))
    return fns


def block_elements(dtype: torch.dtype | str) -> int:
    """Elements of ``dtype`` in one 64-byte cache line: the length of a ``block`` mask's blocks on such a base
    (16 fp32, 32 bf16/fp16, 64 int8/fp8)."""
    return max(1, CACHE_LINE_BYTES // _line_dtype(dtype).itemsize)


def _line_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str):
        named = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(named, torch.dtype):
            raise ValueError(f"line_dtype {dtype!r} is not a torch dtype name (e.g. 'int8', 'bfloat16', 'float32')")
        dtype = named
    if not isinstance(dtype, torch.dtype) or dtype.is_complex or dtype == torch.bool:
        raise ValueError(f"line_dtype must be a real torch dtype (e.g. torch.int8), got {dtype!r}")
    return dtype


def _exclusions(exclude: Any) -> list[Any]:
    if exclude is None:
        return []
    items = list(exclude) if isinstance(exclude, (list, tuple)) else [exclude]
    for item in items:
        if not isinstance(item, (ShiraMaskFn, Mapping)):
            raise TypeError(
                f"exclude: expected mask functions from shira_mask_fn or {{module or weight: mask}} mappings, "
                f"got {type(item).__name__}"
            )
        if isinstance(item, Mapping):
            for key in item:
                if not isinstance(key, (nn.Module, torch.Tensor)):
                    raise TypeError(
                        f"exclude: mapping key {key!r} is not a module or a weight (PEFT passes the module, "
                        f"not its name: use {{model.get_submodule(name): mask}})"
                    )
    return items


def _top_k(score: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted indices of the ``k`` largest entries of 1-D ``score`` (``-inf``: never), ties picked by ``gen``."""
    kth = torch.topk(score, k, sorted=False).values.min()
    above = (score > kth).nonzero().squeeze(1)
    tied = (score == kth).nonzero().squeeze(1)
    pick = torch.randperm(tied.numel(), generator=gen)[: k - above.numel()].to(tied.device)
    return torch.cat([above, tied[pick]]).sort().values


def _struct_score(out: int, inn: int, r: int, seed: int, device: torch.device) -> torch.Tensor:
    """2 on a diagonal, 1 on ``r`` evenly spaced rows and columns, 0 elsewhere: the top-k keeps the diagonal
    whole (it makes the mask high rank), drops random row/column positions or adds random others to make k.
    ``seed`` shifts the rows, columns and diagonal, so seeds ``0 .. stride - 1`` pick disjoint rows."""
    score = torch.zeros(out, inn, device=device)
    n_rows, n_cols = min(r, out), min(r, inn)
    f_rows, f_cols = max(out // n_rows, 1), max(inn // n_cols, 1)
    score[seed % f_rows + f_rows * torch.arange(n_rows, device=device), :] = 1
    score[:, seed % f_cols + f_cols * torch.arange(n_cols, device=device)] = 1
    i = torch.arange(min(out, inn), device=device)
    if out <= inn:
        score[i, (i + seed) % inn] = 2
    else:
        score[(i + seed) % out, i] = 2
    return score


def _block(score: torch.Tensor | None, banned: torch.Tensor, k: int, run: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted flat indices of whole blocks of ``run`` positions (aligned within rows; a row's last block may be
    shorter; excluded positions leave a block), best total ``score`` first (random when ``score`` is None),
    taken while they fit in ``k``; the best positions of the next block fill the remainder."""
    out, inn = banned.shape
    nb = -(-inn // run)
    pad = nb * run - inn
    ok = F.pad(~banned, (0, pad), value=False).view(out * nb, run)
    size = ok.sum(1, dtype=torch.int64)
    elem = None if score is None else F.pad(score, (0, pad)).view(out * nb, run)
    total = torch.rand(out * nb, generator=gen).to(banned.device) if elem is None else (elem * ok).sum(1)
    total = total.masked_fill(size == 0, float("-inf"))
    perm = torch.randperm(out * nb, generator=gen).to(banned.device)  # seeded ties: a stable sort of a shuffle
    order = perm[torch.argsort(total[perm], descending=True, stable=True)]
    csum = size[order].cumsum(0)
    whole = int((csum <= k).sum())
    chosen = torch.zeros_like(ok)
    chosen[order[:whole]] = ok[order[:whole]]
    rest = k - (int(csum[whole - 1]) if whole else 0)
    if rest:
        b = int(order[whole])
        row = torch.zeros(run, device=banned.device) if elem is None else elem[b]  # random blocks: random ties
        chosen[b, _top_k(row.masked_fill(~ok[b], float("-inf")), rest, gen)] = True
    return chosen.view(out, nb * run)[:, :inn].reshape(-1).nonzero().squeeze(1)


def _layer_seed(seed: int, w: torch.Tensor) -> int:
    """A generator seed from ``seed`` and the layer (shape, dtype, a strided sample of its weights)."""
    flat = w.reshape(-1)
    sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
    h = hashlib.blake2b(f"{seed}/{tuple(w.shape)}/{w.dtype}".encode(), digest_size=8)
    h.update(sample.numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def _target_linears(model: nn.Module, targets: Iterable[str] | None) -> dict[str, nn.Linear]:
    """``nn.Linear`` modules by name (a PEFT wrapper's ``.base_layer`` under the wrapper's name) whose name is a
    target or ends with ``.<target>``; all of them when ``targets`` is None."""
    wanted = None if targets is None else [targets] if isinstance(targets, str) else list(targets)
    found = {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        plain = name.removesuffix(".base_layer")
        if wanted is None or any(plain == t or plain.endswith("." + t) for t in wanted):
            found[plain] = m
    if not found:
        raise ValueError(f"no nn.Linear in the model matches targets {wanted}")
    return found


def _next_token_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of the logits at position t against the input id at t + 1 (padding masked out)."""
    if isinstance(batch, torch.Tensor):
        ids, mask, out = batch, None, model(batch)
    elif "input_ids" in batch:
        ids, mask, out = batch["input_ids"], batch.get("attention_mask"), model(**batch)
    else:
        raise ValueError(f"the default loss needs input_ids in the batch (keys: {sorted(batch)}); pass loss_fn")
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
    labels = ids[:, 1:].clone()
    if mask is not None:
        labels[mask[:, 1:] == 0] = -100
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def _gradient_scores(
    model: nn.Module, batch: Batch, loss_fn: LossFn | None, targets: Iterable[str] | None, kind: str
) -> dict[nn.Module, torch.Tensor | None]:
    """``|g|`` (grad) or ``|w * g|`` (snip) in fp32 for the target linears from one forward/backward in fp32.

    The model is left as found: its dtypes (cast back to the original tensors), ``requires_grad`` flags,
    train/eval modes (eval during the pass: no dropout), and no ``.grad`` (``torch.autograd.grad`` is used).
    """
    linears = _target_linears(model, targets)
    weights = list({id(m.weight): m.weight for m in linears.values()}.values())
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    datas = [(p, p.data) for p in params]
    buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    try:
        model.float().eval()
        for p in params:
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            loss = (loss_fn or _next_token_loss)(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise ValueError(f"the loss must be a scalar tensor that depends on the target weights, got {loss!r}")
            grads = dict(zip(map(id, weights), torch.autograd.grad(loss.reshape(()), weights, allow_unused=True)))
        scores = {}
        for m in linears.values():
            g = grads[id(m.weight)]
            scores[m] = None if g is None else (g if kind == "grad" else m.weight.detach() * g).abs()
    finally:
        for p, data in datas:
            p.data = data
        for m, name, b in buffers:
            m._buffers[name] = b
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training
    return scores
