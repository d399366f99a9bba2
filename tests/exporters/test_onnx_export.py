"""export_onnx: bundle layout, dynamic dims, arbitrary modules (embeddings, biases, 3-D activations, tied and
merged weights), fp32/fp16, and clear refusals."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from safetensors.numpy import load_file
from shira_runtime.bundle import FORMAT
from shira_runtime.exporters import ExportError, export_onnx
from shira_runtime.models import build
from shira_runtime.onnx_backend import OnnxBackend
from torch import nn

IDS = torch.zeros(1, 8, dtype=torch.long)


def tol(dtype: torch.dtype) -> dict:
    return {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}


def close(got, want: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(torch.from_numpy(np.asarray(got)).float(), want.detach().float(), **tol(dtype))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    m = build("tiny", torch.float32, seed=3)
    return m, export_onnx(m, IDS, tmp_path_factory.mktemp("b") / "llama", output_names=["logits"])


def test_llama_bundle_files_and_manifest(llama):
    m, path = llama
    man = json.loads((path / "manifest.json").read_text())
    assert (man["format"], man["version"]) == (FORMAT, 2)  # the lowest version that describes it: no uint8 copy
    assert man["inputs"] == [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"], "example_shape": [1, 8]}
    ]
    assert [o["name"] for o in man["outputs"]] == ["logits"] and man["outputs"][0]["shape"][-1] == 256
    sd = m.state_dict()
    assert set(man["parameters"]) == set(sd)  # inv_freq is not persistent: not a parameter
    emb, head = man["parameters"]["model.embed_tokens.weight"], man["parameters"]["lm_head.weight"]
    assert emb["onnx"] == head["onnx"] and emb["layout"] == head["layout"] == "identity"
    # the weight file is a plain safetensors file holding exactly the state_dict values, once per tied group
    stored = load_file(str(path / "weights.safetensors"))
    assert len(stored) == len(sd) - 1
    for name, p in man["parameters"].items():
        assert p["shape"] == list(sd[name].shape) and p["dtype"] == "float32"
        assert np.array_equal(stored[p["onnx"]], sd[name].numpy())
    graph = onnx.load(str(path / "model.onnx")).graph
    assert not any(i.name in stored for i in graph.initializer)  # weights are inputs, never embedded
    assert {i.name for i in graph.input} == {"input_ids"} | set(stored)


def test_llama_dynamic_batch_and_sequence(llama):
    m, path = llama
    backend = OnnxBackend.open(path)
    for shape in ((1, 1), (3, 5), (2, 17)):
        ids = torch.randint(0, 256, shape)
        close(backend(ids), m(ids), torch.float32)


def test_fixed_dims_on_request(tmp_path):
    m = build("tiny", torch.float32)
    path = export_onnx(m, IDS, tmp_path / "b", dynamic=False, verify=False)
    man = json.loads((path / "manifest.json").read_text())
    assert man["inputs"][0]["shape"] == [1, 8] and man["outputs"][0]["name"] == "output"
    backend = OnnxBackend.open(path)
    close(backend(IDS + 3), m(IDS + 3), torch.float32)
    with pytest.raises(ValueError, match="input 'input_ids': shape \\[1, 9\\]"):
        backend(torch.zeros(1, 9, dtype=torch.long))


class Mixed(nn.Module):
    """Embeddings, 3-D activations, biases, LayerNorm, equal-valued parameters (the exporter merges those),
    a buffer, a weight tied between an embedding and an output projection, and two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.pos = nn.Parameter(torch.randn(12, 16) * 0.1)
        self.a = nn.Linear(16, 24)
        self.b = nn.Linear(24, 16)
        self.ln1, self.ln2 = nn.LayerNorm(24), nn.LayerNorm(16)
        self.gain = nn.Parameter(torch.ones(16))
        self.register_buffer("shift", torch.zeros(16))
        self.out = nn.Linear(16, 50, bias=False)
        self.out.weight = self.emb.weight
        with torch.no_grad():
            self.a.bias.zero_()  # equal to b.bias and shift: merged by the exporter, split again by us
            self.b.bias.zero_()

    def forward(self, ids: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.emb(ids) + self.pos[: ids.shape[1]] + feats  # [B, S, 16]
        h = self.ln2(self.b(torch.relu(self.ln1(self.a(h))))) * self.gain + self.shift
        return self.out(h), h.mean(-1)


class Mlp2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(12, 40), nn.GELU(), nn.Linear(40, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mixed_args(dtype):
    return torch.randint(0, 50, (2, 5)), torch.randn(2, 5, 16, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("fold", [False, True], ids=["identity", "folded"])
def test_mixed_module_every_parameter_is_live(tmp_path, dtype, fold):
    torch.manual_seed(0)
    m = Mixed().to(dtype).eval()
    path = export_onnx(m, mixed_args(dtype), tmp_path / "b", fold_transposes=fold)
    backend = OnnxBackend.open(path, gemm_a=True)  # also through the weight-as-GEMM-A rewrite
    assert backend.rewritten == (1 if fold else 3)  # a, b, and the tied output projection
    assert backend.input_names == ["ids", "feats"] and backend.output_names == ["output_0", "output_1"]
    assert backend.aliases["out.weight"] == backend.aliases["emb.weight"] == "emb.weight"
    assert set(backend.tensors) == set(m.state_dict()) - {"out.weight"}
    if fold:
        assert backend.transposed == {"a.weight", "b.weight"}  # emb is read both ways: it stays as it is
    else:
        assert not backend.transposed
    ids, feats = torch.randint(0, 50, (3, 7)), torch.randn(3, 7, 16, dtype=dtype)
    for got, want in zip(backend(ids, feats=feats), m(ids, feats)):
        close(got, want, dtype)
    # merged-by-value parameters are separate again: writing one changes only the module's matching tensor
    for name in ("b.bias", "shift", "ln1.weight", "a.weight", "emb.weight"):
        with torch.no_grad():
            m.state_dict()[name].add_(0.5)
        w = backend.logical(backend.aliases[name])  # a numpy view of the bound weight: written in place
        w += 0.5
        for got, want in zip(backend(ids, feats), m(ids, feats)):
            close(got, want, dtype)


def test_2d_module_with_biases(tmp_path):
    torch.manual_seed(1)
    m = Mlp2d().train()
    path = export_onnx(m, torch.randn(4, 12), tmp_path / "b")
    assert m.training  # exported in eval mode, handed back as it came
    m.eval()
    man = json.loads((path / "manifest.json").read_text())
    assert man["inputs"][0]["shape"] == ["batch", 12]
    backend = OnnxBackend.open(path)
    x = torch.randn(9, 12)
    close(backend(x), m(x), torch.float32)
    close(backend(x.numpy()), m(x), torch.float32)


class DictOut(Mlp2d):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.net(x)
        return {"scores": h, "best": h.max(-1).values}


def test_dict_outputs_are_flattened_in_order(tmp_path):
    torch.manual_seed(2)
    m = DictOut().eval()
    path = export_onnx(m, torch.randn(3, 12), tmp_path / "b", output_names=["scores", "best"])
    backend = OnnxBackend.open(path)
    x = torch.randn(5, 12)
    scores, best = backend(x)
    close(scores, m(x)["scores"], torch.float32)
    close(best, m(x)["best"], torch.float32)


def test_unused_parameters_are_listed_and_warned(tmp_path):
    m = Mlp2d().eval()
    m.spare = nn.Linear(3, 3)
    with pytest.warns(UserWarning, match="spare.weight"):
        path = export_onnx(m, torch.randn(2, 12), tmp_path / "b")
    man = json.loads((path / "manifest.json").read_text())
    assert man["info"]["unused"] == ["spare.bias", "spare.weight"] and "spare.weight" not in man["parameters"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_unsupported_dtype_is_refused(tmp_path, dtype):
    m = Mlp2d().to(dtype)
    with pytest.raises(ExportError, match=f"net.0.weight.*{dtype}"):
        export_onnx(m, torch.randn(2, 12, dtype=dtype), tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_bad_destination_and_names(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="not a directory"):
        export_onnx(Mlp2d(), torch.randn(2, 12), tmp_path / "file")
    with pytest.raises(ExportError, match="parameter names"):
        export_onnx(Mlp2d(), torch.randn(2, 12), tmp_path / "b", input_names=["net.0.weight"])
    with pytest.raises(TypeError, match="example_args"):
        export_onnx(Mlp2d(), [1, 2], tmp_path / "b")
