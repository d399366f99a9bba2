"""SHiRA masks (shira_runtime.masks): exact counts, the paper's selection rules, disjoint sets, use as PEFT's
mask_fn."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from shira_runtime import Runtime, SparseAdapter
from shira_runtime.masks import KINDS, block_elements, mask_indices, shira_mask_fn, shira_masks
from torch import nn

from tests.conftest import assert_bit_identical, snapshot

VOCAB = 32


class TinyLM(nn.Module):
    """Embedding then three linears; in_features 40 and 24 are not multiples of 16, and 64 is."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 40)
        self.up = nn.Linear(40, 64)
        self.mid = nn.Linear(64, 24)
        self.down = nn.Linear(24, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.down(torch.tanh(self.mid(torch.tanh(self.up(self.emb(input_ids))))))


def tiny_lm(dtype: torch.dtype = torch.float32) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM().to(dtype)


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def make(kind: str, model: nn.Module, batch, **kw):
    """``kind``'s mask function; ``block-snip`` is ``block`` scored by SNIP (model and batch given)."""
    if kind == "block-snip":
        return shira_mask_fn("block", model, batch, **kw)
    if kind in ("grad", "snip"):
        return shira_mask_fn(kind, model, batch, **kw)
    return shira_mask_fn(kind, **kw)


def hand_grads(model: nn.Module, batch: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict:
    """fp32 gradients of next-token cross-entropy w.r.t. each linear's weight, by hand on a float copy."""
    m = copy.deepcopy(model).float()
    logits = m(batch)
    labels = batch[:, 1:].clone()
    if attention_mask is not None:
        labels[attention_mask[:, 1:] == 0] = -100
    F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels.reshape(-1)).backward()
    return {name: mod.weight.grad for name, mod in m.named_modules() if isinstance(mod, nn.Linear)}


def top_k(score: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(score.reshape(-1), k).indices.sort().values


ALL = [*KINDS, "block-snip"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ALL)
def test_every_kind_exact_count_shape_dtype_values(kind, dtype):
    model = tiny_lm(dtype)
    fn = make(kind, model, ids())
    for lin, r in itertools.product(linears(model), (1, 3)):
        if kind in ("grad", "snip", "block-snip") and r == 3:
            continue  # gradient scores serve one r per layer
        mask = fn(lin, r, bias=True, random_seed=None)  # PEFT's keyword arguments are accepted
        out, inn = lin.weight.shape
        assert mask.shape == lin.weight.shape and mask.dtype == dtype and mask.device == lin.weight.device
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        assert int(mask.float().sum()) == r * (out + inn)
        assert mask_indices(mask).numel() == r * (out + inn)


def test_wm_picks_largest_magnitudes_and_breaks_ties_by_seed():
    lin = nn.Linear(20, 8, bias=False)
    magnitudes = torch.randperm(160, generator=torch.Generator().manual_seed(3)).float() + 1.0  # distinct |w|
    values = magnitudes * torch.where(torch.arange(160) % 2 == 0, 1.0, -1.0)
    with torch.no_grad():
        lin.weight.copy_(values.view(8, 20))
    k = 2 * (8 + 20)
    assert torch.equal(mask_indices(shira_mask_fn("wm")(lin, 2)).long(), top_k(lin.weight.abs(), k))
    with torch.no_grad():
        lin.weight.copy_(torch.where(torch.arange(160) % 3 == 0, 2.0, -1.0).view(8, 20))  # 54 at |2|, all tied after
    masks = [mask_indices(shira_mask_fn("wm", seed=s)(lin, 2)) for s in (0, 0, 1)]
    for m in masks:
        assert m.numel() == k and bool((lin.weight.reshape(-1)[m.long()].abs() == 2).sum() == 54)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])


@pytest.mark.parametrize("padded", [False, True], ids=["ids", "dict+attention_mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["grad", "snip"])
def test_grad_and_snip_match_hand_gradients_and_leave_the_model_as_found(kind, dtype, padded):
    model = tiny_lm(dtype).train()
    model.emb.weight.requires_grad_(False)
    snap = snapshot(model)
    x = ids()
    attention_mask = torch.ones_like(x)
    attention_mask[0, :3] = 0
    batch = {"input_ids": x, "attention_mask": attention_mask} if padded else x
    fn = shira_mask_fn(kind, model, batch)
    assert_bit_identical(model, snap)
    assert all(p.grad is None for p in model.parameters()) and all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == [False] + [True] * 6
    assert all(p.dtype == dtype for p in model.parameters())
    grads = hand_grads(model, x, attention_mask if padded else None)
    for name, lin in model.named_children():
        if not isinstance(lin, nn.Linear):
            continue
        score = grads[name].abs() if kind == "grad" else (lin.weight.float() * grads[name]).abs()
        k = 2 * sum(lin.weight.shape)
        assert torch.equal(mask_indices(fn(lin, 2)).long(), top_k(score, k)), name


def test_loss_fn_replaces_the_default_loss():
    model, x = tiny_lm(), ids()
    fn = shira_mask_fn("grad", model, x, loss_fn=lambda m, b: m(b)[:, -1, 0].square().sum())
    ref = copy.deepcopy(model)
    ref(x)[:, -1, 0].square().sum().backward()
    assert torch.equal(mask_indices(fn(model.mid, 2)).long(), top_k(ref.mid.weight.grad.abs(), 2 * (24 + 64)))


def test_errors_name_the_kind_and_layer_at_fault():
    model, x = tiny_lm(), ids()
    for kind in ("grad", "snip"):
        with pytest.raises(ValueError, match=f"kind '{kind}' needs model and batch; got model=None, batch=None"):
            shira_mask_fn(kind)
        with pytest.raises(ValueError, match="needs model and batch; got model=given, batch=None"):
            shira_mask_fn(kind, model)
    with pytest.raises(
        ValueError, match="unknown SHiRA mask kind 'lowrank'; the kinds are struct, rand, wm, grad, snip, block"
    ):
        shira_mask_fn("lowrank")
    with pytest.raises(ValueError, match="'block' needs both model and batch"):
        shira_mask_fn("block", model)
    with pytest.raises(ValueError, match="'wm' uses no batch"):
        shira_mask_fn("wm", model, x)
    fn = shira_mask_fn("snip", model, x, targets=["up", "mid"])
    with pytest.raises(ValueError, match=r"layer 'down' \(Linear.*only for the targets \(up, mid\)"):
        fn(model.down, 2)
    with pytest.raises(ValueError, match="not a module of the model the gradients were computed on"):
        fn(nn.Linear(40, 64), 2)
    fn(model.up, 2)
    with pytest.raises(ValueError, match="layer 'up' .* freed after its first mask"):
        fn(model.up, 3)
    with pytest.raises(ValueError, match=r"r=100 needs r \* \(out \+ in\) = 10400 positions, the weight has 2560"):
        shira_mask_fn("rand")(model.up, 100)
    with pytest.raises(TypeError, match="SHiRA masks are for nn.Linear layers, got Embedding"):
        shira_mask_fn("rand")(model.emb, 1)
    with pytest.raises(TypeError, match=r"key .up. is not a module or a weight.*\{model.get_submodule\(name\): mask\}"):
        shira_mask_fn("rand", exclude={"up": torch.ones(64, 40)})
    with pytest.raises(TypeError, match="exclude: expected mask functions .* got Tensor"):
        shira_mask_fn("rand", exclude=torch.ones(64, 40))
    with pytest.raises(ValueError, match=r"an excluded mask has shape \(40, 64\), the weight has \(64, 40\)"):
        shira_mask_fn("rand", exclude={model.up: torch.ones(40, 64)})(model.up, 1)
    with pytest.raises(ValueError, match="the default loss needs input_ids"):
        shira_mask_fn("grad", model, {"x": x})
    with pytest.raises(ValueError, match="mask_indices: the mask holds 0.5 at flat index 1"):
        mask_indices(torch.tensor([1.0, 0.5]))


@pytest.mark.parametrize(
    "dtype,inn,line,run",
    [
        (torch.float32, 64, None, 16),
        (torch.bfloat16, 64, None, 32),
        (torch.float32, 40, None, 16),
        (torch.float32, 256, torch.int8, 64),  # made on fp32 for an int8 base: 64-element blocks
        (torch.float32, 256, "float8_e4m3fn", 64),
        (torch.bfloat16, 128, torch.float32, 16),
        (torch.float32, 100, "int8", 64),  # rows not a multiple of the block
    ],
)
def test_block_takes_aligned_cache_lines(dtype, inn, line, run):
    torch.manual_seed(0)
    lin = nn.Linear(inn, 24).to(dtype)
    assert block_elements(line if line is not None else dtype) == run
    k = 2 * (24 + inn)
    mask = shira_mask_fn("block", seed=5, line_dtype=line)(lin, 2).float()
    nb = -(-inn // run)
    per_block = F.pad(mask, (0, nb * run - inn)).view(24, nb, run).sum(-1)  # ones per aligned run
    size = torch.tensor([min(run, inn - b * run) for b in range(nb)]).expand(24, nb)
    partial = (per_block > 0) & (per_block < size)
    assert int(partial.sum()) <= 1, "whole blocks, and at most one block's best positions fill the remainder"
    if inn % run == 0:
        assert int((per_block > 0).sum()) == -(-k // run)  # touched 64-byte lines


def test_line_dtype_is_refused_where_it_means_nothing():
    with pytest.raises(ValueError, match="line_dtype 'fp6' is not a torch dtype name"):
        shira_mask_fn("block", line_dtype="fp6")
    with pytest.raises(ValueError, match="line_dtype must be a real torch dtype"):
        shira_mask_fn("block", line_dtype=torch.bool)
    with pytest.raises(ValueError, match="SHiRA mask kind 'rand' takes no line_dtype"):
        shira_mask_fn("rand", line_dtype=torch.int8)


def test_blocks_for_int8_are_whole_lines_on_every_wider_dtype():
    """A mask made with 64-element blocks (an int8 base's lines) covers whole lines of fp32 and bf16 too; one made
    with fp32's 16-element blocks is valid on int8 but takes a quarter of each line it touches."""
    lin = nn.Linear(256, 32)
    idx = shira_mask_fn("block", seed=3, line_dtype=torch.int8).flat(lin, 4)
    for size in (4, 2, 1):  # fp32, bf16, int8 lines: every touched line is full
        lines = torch.unique(idx * size // 64)
        assert lines.numel() * 64 // size == idx.numel()
    narrow = shira_mask_fn("block", seed=3).flat(lin, 4)
    assert torch.unique(narrow // 64).numel() >= 2 * torch.unique(idx // 64).numel()


@pytest.mark.parametrize("out, inn", [(256, 48), (100, 32)])  # out a multiple of the block, and not
def test_transposed_blocks_are_lines_of_the_int8_bundles_copy(out, inn):
    """``transposed=True``: the blocks are aligned lines of the weight stored ``[in, out]`` (an int8 bundle's uint8
    copy): in that layout every touched line is whole but at most one, the count is exact, the indices are the
    logical row-major ones (sorted), and excluded positions stay out; in the ``[out, in]`` layout they are single
    elements a row apart."""
    lin = nn.Linear(inn, out)
    k = 3 * (out + inn)
    idx = shira_mask_fn("block", seed=4, line_dtype=torch.int8, transposed=True).flat(lin, 3)
    assert idx.numel() == k and torch.equal(idx, idx.sort().values) and idx.unique().numel() == k
    t = (idx % inn) * out + idx // inn  # the entries' positions in the [in, out] copy
    col, row = t // out, t % out
    line = col * (-(-out // 64)) + row // 64  # aligned 64-row lines within each column of the copy
    per_line = torch.bincount(line)
    size = torch.tensor([min(64, out - (i % -(-out // 64)) * 64) for i in range(per_line.numel())])
    partial = (per_line > 0) & (per_line < size)
    assert int(partial.sum()) <= 1
    assert torch.unique(idx // 64).numel() > 4 * torch.unique(line).numel()  # row-major: scattered
    banned = torch.zeros(out, inn, dtype=torch.bool)
    banned[::3] = True
    held = shira_mask_fn("block", seed=4, line_dtype=torch.int8, transposed=True, exclude=[{lin.weight: banned}])
    assert not bool(banned.view(-1)[held.flat(lin, 3)].any())
    with pytest.raises(ValueError, match="SHiRA mask kind 'rand' takes no transposed"):
        shira_mask_fn("rand", transposed=True)


def test_snip_blocks_are_the_best_summed_blocks():
    model, x = tiny_lm(), ids()
    fn = shira_mask_fn("block", model, x)
    grads = hand_grads(model, x)
    score = (model.up.weight * grads["up"]).abs()  # [64, 40]: runs of 16, 16, 8 per row
    mask = fn(model.up, 2)
    blocks = [(row, c, min(c + 16, 40)) for row in range(64) for c in (0, 16, 32)]
    full = [score[r, a:b].sum() for r, a, b in blocks if bool(mask[r, a:b].all())]
    empty = [score[r, a:b].sum() for r, a, b in blocks if not bool(mask[r, a:b].any())]
    assert len(full) >= (2 * (64 + 40)) // 16 - 1 and min(full) >= max(empty)


@pytest.mark.parametrize("kind", ["struct", "rand", "wm", "snip", "block"])
def test_non_overlapping_sets_are_disjoint_and_exact(kind):
    model, x = tiny_lm(), ids()
    scored = kind == "snip"
    fns = shira_masks(kind, 3, model if scored else None, x if scored else None, overlap=False)
    for lin in linears(model):
        masks = [fn(lin, 2) for fn in fns]
        assert all(int(m.sum()) == 2 * sum(lin.weight.shape) for m in masks)
        assert int(torch.stack(masks).sum(0).max()) == 1, "a position in two masks"


@pytest.mark.parametrize("kind", ["struct", "rand", "block"])
def test_overlapping_sets_from_different_seeds_differ(kind):
    model = tiny_lm()
    fns = shira_masks(kind, 3)
    for lin in linears(model):
        masks = [mask_indices(fn(lin, 2)) for fn in fns]
        assert all(not torch.equal(a, b) for a, b in itertools.combinations(masks, 2))


def test_one_batch_per_adapter_gives_each_its_own_gradients():
    model = tiny_lm()
    b0, b1 = ids(0), ids(1)
    fns = shira_masks("grad", 2, model, [b0, b1])
    for fn, batch in zip(fns, (b0, b1)):
        assert torch.equal(fn(model.mid, 2), shira_mask_fn("grad", model, batch)(model.mid, 2))
    assert not torch.equal(fns[0](model.mid, 2), fns[1](model.mid, 2))
    with pytest.raises(ValueError, match="shira_masks: 2 batches for n=3 adapters"):
        shira_masks("grad", 3, model, [b0, b1])


def test_exclude_takes_mappings_and_computes_earlier_masks_on_demand():
    model = tiny_lm()
    a = shira_mask_fn("rand", seed=0)
    b = shira_mask_fn("rand", seed=1, exclude=[a])
    mb = b(model.up, 2)  # a's mask of this layer is made now, for b
    assert int((mb * a(model.up, 2)).sum()) == 0 and torch.equal(a(model.up, 2), shira_mask_fn("rand")(model.up, 2))
    taken = shira_mask_fn("wm")(model.mid, 2)
    for key in (model.mid, model.mid.weight):
        m = shira_mask_fn("wm", exclude={key: taken.bool()})(model.mid, 2)
        assert int((m * taken).sum()) == 0 and int(m.sum()) == int(taken.sum())
    one = shira_mask_fn("rand", exclude=[{model.up: torch.ones(64, 40)}])
    with pytest.raises(ValueError, match="only 0 remain outside the excluded masks"):
        one(model.up, 1)


@pytest.mark.parametrize("kind", ALL)
def test_same_seed_same_mask(kind):
    masks = []
    for _ in range(2):
        model = tiny_lm()
        fn = make(kind, model, ids(), seed=7)
        masks.append([mask_indices(fn(lin, 2)) for lin in linears(model)])
    assert all(torch.equal(a, b) for a, b in zip(*masks))


def test_rand_differs_between_layers_of_one_shape():
    torch.manual_seed(0)
    a, b = nn.Linear(32, 32), nn.Linear(32, 32)
    fn = shira_mask_fn("rand")
    assert not torch.equal(fn(a, 2), fn(b, 2))


def test_struct_is_the_diagonal_plus_rows_and_columns():
    lin = nn.Linear(64, 64)
    mask = shira_mask_fn("struct")(lin, 2)  # seed 0: rows and columns 0 and 32 (stride 64 // r), the main diagonal
    assert bool(mask.diagonal().all())
    structure = torch.eye(64, dtype=torch.bool)
    structure[[0, 32], :] = True
    structure[:, [0, 32]] = True
    assert int(structure.sum()) > int(mask.sum()) == 256  # 314 structured positions: 58 row/column ones dropped
    assert not bool((mask.bool() & ~structure).any())
    shifted = shira_mask_fn("struct", seed=1)(lin, 2)  # rows/columns 1 and 33, the diagonal shifted by one
    assert bool(shifted[torch.arange(64), (torch.arange(64) + 1) % 64].all()) and int((shifted * mask).sum()) < 20


def tiny_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", ["wm", "snip"])
def test_works_as_peft_mask_fn_and_loads_in_the_runtime(tmp_path, kind):
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    model = copy.deepcopy(base)
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": x, "attention_mask": torch.ones_like(x)}
    fn = shira_mask_fn(kind, model, batch) if kind == "snip" else shira_mask_fn(kind)
    config = peft.ShiraConfig(r=2, target_modules=["q_proj", "v_proj"], init_weights=False)
    config.mask_fn = fn
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, config)
    for proj in ("q_proj", "v_proj"):
        layer = getattr(pm.base_model.model.model.layers[1].self_attn, proj)
        stored = layer.shira_indices["default"].long()  # [2, K]: (row, col)
        assert torch.equal(stored, fn(layer.base_layer, 2).nonzero().T)
        assert stored.shape[1] == 2 * sum(layer.base_layer.weight.shape)
    pm.save_pretrained(str(tmp_path))
    merged = pm.merge_and_unload().eval()
    adapter = SparseAdapter.from_peft(tmp_path)
    ours = fn.indices(merged, ["q_proj", "v_proj"], 2)  # memoized: the masks PEFT got
    assert set(ours) == set(adapter.indices) and len(ours) == 4
    for name, idx in ours.items():
        shape = merged.get_parameter(name).shape
        assert torch.equal(adapter.flat(name, shape)[0], idx)
    rt = Runtime.load(base)
    rt.add_adapter("a", tmp_path)
    rt.switch("a")
    with torch.no_grad():
        torch.testing.assert_close(rt(x).logits, merged(x).logits, atol=1e-5, rtol=1e-5)


def test_disjoint_peft_adapters_through_add_adapter():
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    targets = ["q_proj", "v_proj"]
    fns = shira_masks("snip", 3, model, {"input_ids": x}, overlap=False, targets=targets)
    configs = [peft.ShiraConfig(r=2, target_modules=targets) for _ in fns]
    for config, fn in zip(configs, fns):
        config.mask_fn = fn
    pm = peft.get_peft_model(model, configs[0], adapter_name="a0")
    pm.add_adapter("a1", configs[1])
    pm.add_adapter("a2", configs[2])
    layers = [m for m in pm.modules() if hasattr(m, "shira_indices")]
    assert len(layers) == 4
    for layer in layers:
        k = 2 * sum(layer.base_layer.weight.shape)
        rows_cols = [layer.shira_indices[a].long() for a in ("a0", "a1", "a2")]  # [2, K] each
        flat = [rc[0] * layer.in_features + rc[1] for rc in rows_cols]
        assert all(f.numel() == k for f in flat) and torch.cat(flat).unique().numel() == 3 * k
