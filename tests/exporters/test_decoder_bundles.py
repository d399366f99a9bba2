"""transformers decoders exported with their KV cache: greedy rt.generate on the bundle, with an adapter made by
PEFT switched in, gives the tokens of transformers' own generate on the PEFT-merged model (a batch of two
prompts of different lengths, left-padded); the cached steps agree with the full-sequence forward; both of the
bundle's sessions read the live weights. Tiny random configs, no download."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("onnxscript")

from shira_runtime import Runtime  # noqa: E402
from shira_runtime.exporters import ExportError, export_onnx  # noqa: E402
from shira_runtime.onnx_backend import LiveWeightsError, OnnxBackend  # noqa: E402

from tests.exporters.test_transformers_export import ARCHS, X  # noqa: E402

DECODERS = [a for a in sorted(ARCHS) if a != "bert"]
NEW = 16


def padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts, of 7 and 4 tokens, the shorter padded on the left."""
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids, mask


def build(arch: str):
    cfg, cls, targets = ARCHS[arch]
    torch.manual_seed(0)
    return cls(cfg).eval(), targets


@pytest.fixture(scope="module")
def llama_bundle(tmp_path_factory):
    model, _ = build("llama")
    return model, export_onnx(model, (X[:1],), tmp_path_factory.mktemp("llama") / "bundle")


@pytest.mark.parametrize("arch", DECODERS)
def test_greedy_generate_on_the_bundle_gives_the_peft_merged_models_tokens(arch, tmp_path):
    model, targets = build(arch)
    fan = arch == "gpt2"  # Conv1D stores [in, out]; PEFT's SHiRA wraps nn.Linear only
    if fan:
        config = peft.LoraConfig(r=4, target_modules=targets, init_lora_weights=False, fan_in_fan_out=True)
    else:
        config = peft.ShiraConfig(r=2, target_modules=targets, init_weights=False)
    adapted = peft.get_peft_model(copy.deepcopy(model), config)
    adapted.save_pretrained(str(tmp_path / "adapter"))
    merged = adapted.merge_and_unload().eval()
    rt = Runtime.load(export_onnx(model, (X[:1],), tmp_path / "bundle"))
    assert rt.backend.decoder is not None
    rt.add_adapter("a", tmp_path / "adapter")
    ids, mask = padded_prompts()
    base = rt.generate(ids, max_new_tokens=NEW, attention_mask=mask)
    assert torch.equal(base, model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False))
    base_logits = rt(ids, attention_mask=mask)
    rt.switch("a")
    got = rt.generate(ids, max_new_tokens=NEW, attention_mask=mask)
    want = merged.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    assert got.shape == (2, 7 + NEW)
    assert torch.equal(got, want)
    assert np.abs(rt(ids, attention_mask=mask) - base_logits).max() > 1e-3  # the adapter is in the bundle
    rt.switch(None)
    assert torch.equal(rt.generate(ids, max_new_tokens=NEW, attention_mask=mask), base)


def test_cached_steps_agree_with_the_full_sequence_forward(llama_bundle):
    model, path = llama_bundle
    backend = OnnxBackend.open(path)
    ids, mask = padded_prompts()
    full = backend(ids.numpy(), attention_mask=mask.numpy())  # no past given: the logits alone
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits.numpy()
    real = mask.numpy().astype(bool)
    assert np.abs(full - want)[real].max() < 1e-4
    # the prompt minus its last token, then that token as a one-token step over the cache
    logits, cache = backend.step(ids[:, :-1].numpy(), mask[:, :-1].numpy(), None)
    assert np.abs(logits - want[:, -2]).max() < 1e-4
    logits, cache = backend.step(ids[:, -1:].numpy(), mask.numpy(), cache)
    assert np.abs(logits - want[:, -1]).max() < 1e-4
    assert cache[0].shape()[2] == ids.shape[1]


def test_the_one_token_session_agrees_with_the_prefill_session(llama_bundle):
    _, path = llama_bundle
    backend = OnnxBackend.open(path)
    assert backend.one_row_session is not backend.session
    ids = X[:1, :3].numpy()
    _, cache = backend.step(ids, np.ones((1, 3), np.int64), None)
    past = {n: v.numpy() for n, v in zip(backend._past_names(), cache)}
    nxt, mask = np.array([[9]]), np.ones((1, 4), np.int64)
    one = backend(nxt, attention_mask=mask, **past)  # one token: the one-row session
    d = backend.decoder
    feed = backend._feed((), {d["input_ids"]: nxt, d["attention_mask"]: mask, **past})
    outs = backend.session.run([d["logits"]], feed | {n: a for n, a in backend.arrays.items()})
    assert np.abs(one[0] - outs[0]).max() < 1e-5


def test_sampling_on_the_bundle_is_seeded_and_top_k_1_is_greedy(llama_bundle):
    _, path = llama_bundle
    rt = Runtime.load(path)
    ids, mask = padded_prompts()
    kw = dict(max_new_tokens=12, attention_mask=mask, do_sample=True, temperature=1.5)
    a, b = rt.generate(ids, seed=1, **kw), rt.generate(ids, seed=1, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a, rt.generate(ids, seed=2, **kw))
    greedy = rt.generate(ids, max_new_tokens=12, attention_mask=mask)
    assert torch.equal(rt.generate(ids, seed=3, top_k=1, **kw), greedy)
    assert torch.equal(rt.generate(ids, seed=3, top_p=1e-6, **kw), greedy)


def test_eos_stops_rows_and_pads_them_like_transformers(llama_bundle):
    model, path = llama_bundle
    rt = Runtime.load(path)
    ids, mask = padded_prompts()
    free = rt.generate(ids, max_new_tokens=NEW, attention_mask=mask, eos_token_id=[])
    eos = int(free[0, 7 + 2])  # row 0's third new token
    got = rt.generate(ids, max_new_tokens=NEW, attention_mask=mask, eos_token_id=eos)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, eos_token_id=eos)
    assert torch.equal(got, want)
    assert int(got[0, 7 + 2]) == eos and bool((got[0, 7 + 3 :] == model.generation_config.pad_token_id).all())


def test_the_default_end_token_is_the_models(tmp_path):
    model, _ = build("llama")
    ids, mask = padded_prompts()
    free = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
    model.generation_config.eos_token_id = int(free[1, 7 + 1])  # row 1's second new token
    path = export_onnx(model, (X[:1],), tmp_path / "b")
    got = Runtime.load(path).generate(ids, max_new_tokens=NEW, attention_mask=mask)
    assert torch.equal(got, model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False))
    assert int(got[1, 7 + 1]) == model.generation_config.eos_token_id


def test_a_switch_waits_for_a_running_bundle_generation(llama_bundle, tmp_path):
    model, path = llama_bundle
    rt = Runtime.load(path)
    adapter = peft.get_peft_model(
        copy.deepcopy(model), peft.ShiraConfig(r=2, target_modules=["q_proj"], init_weights=False)
    )
    adapter.save_pretrained(str(tmp_path / "s"))
    rt.add_adapter("s", tmp_path / "s")
    ids, mask = padded_prompts()
    base = rt.generate(ids, max_new_tokens=NEW, attention_mask=mask)
    steps, switched = [], threading.Event()
    step = rt.backend.step

    def slow_step(*a):
        if len(steps) == 2:  # mid-generation: a switch is requested and must wait
            threading.Thread(target=lambda: (rt.switch("s"), switched.set())).start()
            assert not switched.wait(0.3)
        steps.append(1)
        return step(*a)

    rt.backend.step = slow_step
    got = rt.generate(ids, max_new_tokens=NEW, attention_mask=mask)
    assert torch.equal(got, base)  # every token from the base
    assert switched.wait(10) and rt.active == (("s", 1.0),)


def test_both_sessions_are_probed_for_live_weights(llama_bundle):
    import onnxruntime as ort

    _, path = llama_bundle
    backend = OnnxBackend.open(path)
    backend.check_live()
    copies = {n: ort.OrtValue.ortvalue_from_numpy(a.copy()) for n, a in backend.arrays.items()}
    bind = backend._binding

    def copying_one_row_binding(session):  # an onnxruntime that copies the weights in one session only
        b = bind(session)
        if session is backend.one_row_session:
            for name, v in copies.items():
                b.bind_ortvalue_input(name, v)
        return b

    backend._binding = copying_one_row_binding
    backend._local = threading.local()
    with pytest.raises(LiveWeightsError, match="one-token session"):
        backend.check_live()


def test_kv_cache_export_refuses_what_it_cannot_do(tmp_path):
    model, _ = build("llama")
    with pytest.raises(ExportError, match="input_ids alone"):
        export_onnx(model, (X[:1], X[:1]), tmp_path / "a")
    with pytest.raises(ExportError, match="drop input_names"):
        export_onnx(model, (X[:1],), tmp_path / "b", input_names=["ids"])
    with pytest.raises(ExportError, match="dynamo"):
        export_onnx(model, (X[:1],), tmp_path / "c", exporter="torchscript", kv_cache=True)
    bert, _ = build("bert")
    with pytest.raises(ExportError, match="not a transformers model that generates"):
        export_onnx(bert, (X[:1],), tmp_path / "d", kv_cache=True)


DECODER_EDITS = {
    "no cache list": lambda d: d.pop("cache"),
    "empty cache": lambda d: d.update(cache=[]),
    "unknown past input": lambda d: d["cache"][0].__setitem__(0, "nope"),
    "unknown present output": lambda d: d["cache"][1].__setitem__(3, "nope"),
    "three names for a layer": lambda d: d["cache"][0].pop(),
    "ids named after a cache input": lambda d: d.update(input_ids="past_key_values.0.key"),
    "positions named after no input": lambda d: d.update(position_ids="pos"),
    "logits named after an input": lambda d: d.update(logits="input_ids"),
    "a string end token": lambda d: d.update(eos_token_id="2"),
    "a negative padding token": lambda d: d.update(pad_token_id=-1),
    "not a mapping": lambda d: (d.clear(), d.update(cache="x")),
}


@pytest.mark.parametrize("edit", sorted(DECODER_EDITS))
def test_a_lying_decoder_section_is_refused_naming_it(llama_bundle, tmp_path, edit):
    """A re-sealed manifest whose decoder section names the wrong inputs, outputs or tokens fails at load with a
    BundleError naming the section, before any session starts."""
    import shutil

    from shira_runtime.bundle import BundleError
    from shira_runtime.manifest import Manifest

    _, path = llama_bundle
    copy_ = tmp_path / "b"
    shutil.copytree(path, copy_)
    m = Manifest.read(copy_)
    DECODER_EDITS[edit](m.decoder)
    m.decoder = m.decoder or {"cache": "x"}
    m.write(copy_)
    with pytest.raises(BundleError, match="decoder"):
        Runtime.load(copy_)
