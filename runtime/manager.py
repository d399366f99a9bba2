"""``Runtime``: the public entry point. Load a base, register adapters, switch them in place, run inference."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shira_runtime.adapters import Source, load_adapter
from shira_runtime.arrays import NUMPY
from shira_runtime.backend import Backend
from shira_runtime.bank import prepare
from shira_runtime.bundle import BundleError
from shira_runtime.errors import ShiraError, UnknownAdapterError
from shira_runtime.generate import Sampling, cached_loop, check_ids, checked_logits, loop
from shira_runtime.manifest import Manifest
from shira_runtime.rwlock import RWLock
from shira_runtime.switcher import Prepared, Switcher, SwitchStats

Names = str | Sequence[str] | None


class Runtime:
    """Adapters switched in place on one base model.

    >>> rt = Runtime.load(model)
    >>> rt.add_adapter("a", "a.safetensors")
    >>> rt.switch("a"); y = rt(x); rt.switch(None)
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._numpy = backend.ops is NUMPY  # a bundle: adapters read as numpy arrays, torch never imported
        self._switcher = Switcher(backend)
        self._bank: dict[str, Prepared] = {}
        self._pending: dict[str, tuple[Source, str | None]] = {}  # registered lazily: read at first use
        self._lock = RWLock()
        self._bank_lock = threading.RLock()  # _get names the registered adapters in its error

    @classmethod
    def load(cls, base: Any) -> Runtime:
        """A runtime over a ``torch.nn.Module`` (its weights are switched in place), an exported bundle directory
        (``manifest.json``: the onnxruntime backend, the bundle's adapters registered), or a transformers model
        directory (``config.json`` and weights, as ``save_pretrained`` writes them: loaded in the dtype it was
        saved in, on the torch backend).

        A bundle needs no torch (numpy, onnxruntime and the kernel core: the device path); a module or a
        transformers directory needs the ``[torch]`` extra."""
        if isinstance(base, (str, Path)):
            path = Path(base)
            if dir_kind(path) == "transformers":
                _need_torch("a transformers model directory")
                from shira_runtime.models import load_pretrained
                from shira_runtime.torch_backend import TorchBackend

                return cls(TorchBackend(load_pretrained(path)))
            from shira_runtime.onnx_backend import OnnxBackend

            rt = cls(OnnxBackend.open(path))
            rt._register_bundled(path, rt.backend.manifest)
            return rt
        if _is_module(base):
            from shira_runtime.torch_backend import TorchBackend

            return cls(TorchBackend(base))
        raise TypeError(
            "Runtime.load needs a torch.nn.Module, a bundle directory or a transformers model directory, "
            f"got {type(base).__name__}"
        )

    def _register_bundled(self, bundle: Path, manifest: Manifest) -> None:
        """Register the adapters a packaged bundle lists (the manifest checked their names and paths), lazily:
        each is read and verified (checksums, fingerprint) before its first switch."""
        for name, entry in manifest.adapters.items():
            self.add_adapter(name, bundle / entry["path"], lazy=True)

    # -- adapters --
    @property
    def adapters(self) -> tuple[str, ...]:
        """Registered names, in registration order (lazily registered ones included)."""
        with self._bank_lock:
            return tuple(dict.fromkeys([*self._bank, *self._pending]))

    @property
    def active(self) -> tuple[tuple[str, float], ...]:
        return self._switcher.plan.active

    def add_adapter(self, name: str, source: Source, mode: str | None = None, lazy: bool = False) -> None:
        """Register ``source`` (our file, a PEFT SHiRA/LoRA directory, or an in-memory adapter) as ``name``.

        The adapter is decoded and checked against this base now (names, shapes, indices, values, fingerprint);
        nothing is written to the weights. ``mode`` is for LoRA: ``"fused"`` (default: merged into the weights
        at switch, exact revert) or ``"unfused"`` (weights untouched; an extra ``x @ A.T @ B.T * s`` path runs
        at inference; on a bundle, it needs LoRA slots: ``export_onnx(..., lora_rank=R)``). ``lazy=True`` only
        records the source: it is read and checked at its first ``switch`` (a bad file then fails that switch,
        which changes nothing).
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
        self._check_free(name)
        if lazy:
            with self._bank_lock:
                self._check_free(name)
                self._pending[name] = (source, mode)
            return
        adapter = load_adapter(source, numpy=self._numpy)
        with self._lock.read():  # the fingerprint reads base values: no switch may run meanwhile
            prepared = self._prepare(name, adapter, mode)
        with self._bank_lock:
            self._check_free(name)
            self._bank[name] = prepared

    def _check_free(self, name: str) -> None:
        if name in self._bank or name in self._pending:
            raise ValueError(f"an adapter named {name!r} is already registered (remove_adapter it first)")

    def remove_adapter(self, name: str) -> None:
        with self._lock.write(), self._bank_lock:
            if name in self._pending:
                del self._pending[name]
                return
            self._get(name)
            if any(n == name for n, _ in self.active):
                raise ShiraError(f"adapter {name!r} is active; switch away from it before removing it")
            self._switcher.forget(self._bank.pop(name))  # and the plans kept for it

    def _prepare(self, name: str, adapter: Any, mode: str | None) -> Prepared:
        try:
            return prepare(self.backend, self._switcher, name, adapter, mode)
        except ShiraError:  # checked against base values: a base that fails its own integrity check is the fault
            self.backend.verified()
            raise

    def _get(self, name: str) -> Prepared:
        """The prepared adapter; a lazily registered one is read and checked now (call under the write lock)."""
        if name in self._bank:
            return self._bank[name]
        if name in self._pending:
            source, mode = self._pending[name]
            adapter = load_adapter(source, numpy=self._numpy)
            self._bank[name] = self._prepare(name, adapter, mode)
            del self._pending[name]
            return self._bank[name]
        raise UnknownAdapterError(f"no adapter named {name!r}; registered: {list(self.adapters)}")

    # -- switching --
    def switch(self, names: Names, weights: Sequence[float] | float | None = None) -> SwitchStats:
        """Make ``names`` (one name, several to fuse, or None for the base) the applied state, in place.

        Everything is validated before the first write; a failed switch leaves the weights as they were.
        """
        items = self._items(names, weights)
        with self._lock.write():
            t0 = time.perf_counter()
            with self._bank_lock:
                prepared = [(self._get(n), w) for n, w in items]
            return self._switcher.switch(self._switcher.make_plan(prepared), t0)

    @staticmethod
    def _items(names: Names, weights: Sequence[float] | float | None) -> list[tuple[str, float]]:
        if names is None:
            if weights is not None:
                raise ValueError("weights given with names=None")
            return []
        if weights is None and type(names) is str:  # the common call, switch("a"): what the checks below give
            return [(names, 1.0)]
        if isinstance(names, str):
            names = [names]
        names = list(names)
        if weights is None:
            weights = [1.0] * len(names)
        elif isinstance(weights, (int, float)):
            weights = [float(weights)] * len(names)
        weights = [float(w) for w in weights]
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapter names but {len(weights)} weights")
        if len(set(names)) != len(names):
            raise ValueError(f"an adapter is named twice in {names}")
        for n, w in zip(names, weights):
            if not isinstance(n, str):
                raise TypeError(f"adapter names are strings, got {n!r}")
            if w != w or w in (float("inf"), float("-inf")):
                raise ValueError(f"weight {w} for adapter {n!r} is not finite")
        return list(zip(names, weights))

    @contextmanager
    def using(self, names: Names, weights: Sequence[float] | float | None = None) -> Iterator[SwitchStats]:
        """Switch for the duration of a ``with`` block, then back to what was active before."""
        before = self.active
        stats = self.switch(names, weights)
        try:
            yield stats
        finally:
            self.switch([n for n, _ in before] or None, [w for _, w in before] or None)

    def huge_pages(self) -> int:
        """Move the switched weights onto transparent huge pages where the OS allows (Linux 6.1+, THP not
        disabled; anonymous memory such as a torch model's weights: a bundle's file-backed map is asked too, and
        the kernel usually declines): fewer TLB misses for a switch's scattered lines (``shira_runtime.hugepages``).
        A one-off copy of the weights by the kernel (about a second per GB); values unchanged, and inference may
        run meanwhile (no switch does). Returns the bytes moved (0 where it cannot: a hint, never an error)."""
        from shira_runtime.hugepages import collapse

        with self._lock.read():  # no switch meanwhile; the kernel moves pages under running reads safely
            return collapse(map(self.backend.ops.region, self.backend.tensors.values()))

    # -- inference --
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """One inference with whatever is applied; never overlaps a switch."""
        with self._lock.read():
            return self.backend(*args, **kwargs)

    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id: int | list[int] | None = None,
        attention_mask: Any = None,
    ) -> Any:
        """Generate up to ``max_new_tokens`` after ``input_ids`` ``[batch, seq]`` with the active adapter; returns
        ``[batch, seq + new]`` (prompt, then new tokens), like transformers' ``generate``. Greedy by default;
        ``do_sample=True`` samples with ``temperature``, ``top_k``, ``top_p`` (reproducible with ``seed``).

        ``eos_token_id`` stops a row (default: the model's own, from its generation config, as transformers does);
        finished rows are filled with the padding token. ``attention_mask`` marks left padding (0) in a batch of
        prompts of different lengths.

        The generation holds the inference side of the lock throughout: no switch lands inside it. A transformers
        model on the torch backend runs its own ``generate``; a bundle exported with its KV cache runs a prefill
        then one-token steps over the cache; other decoders re-run the sequence each step, without padding (see
        ``shira_runtime.generate``)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        sampling = Sampling(do_sample, temperature, top_k, top_p, seed)
        module = getattr(self.backend, "module", None)
        ids, mask = check_ids(input_ids, attention_mask, as_torch=module is not None)
        decoder = getattr(self.backend, "decoder", None)
        with self._lock.read():
            if module is not None and hasattr(module, "generation_config") and callable(module.generate):
                return _hf_generate(module, ids, mask, max_new_tokens, sampling, eos_token_id)
            if decoder is not None:  # a bundle with its KV cache; the model's own end token by default
                eos = eos_token_id if eos_token_id is not None else decoder.get("eos_token_id")
                return cached_loop(
                    self.backend.step, ids, mask, max_new_tokens, sampling, eos, decoder.get("pad_token_id")
                )
            if mask is not None and not bool(mask.all()):
                raise ValueError(
                    "a batch with padding needs a KV-cache bundle or a transformers model on the torch backend; "
                    "this decoder takes prompts of one length (attention_mask all ones)"
                )
            if module is None:
                what, hint = f"the bundle {getattr(self.backend, 'bundle', '')}", ""
            else:
                what, hint = type(module).__name__, ""
                if hasattr(module, "can_generate"):  # a transformers model without a language-model head
                    hint = " (a transformers model generates from its causal-LM class, e.g. AutoModelForCausalLM)"
            return loop(checked_logits(self.backend, what, hint), ids, max_new_tokens, sampling, eos_token_id)

    def __repr__(self) -> str:
        return f"Runtime({self.backend.kind}, adapters={list(self.adapters)}, active={self.active})"


def dir_kind(path: Path) -> str:
    """``"bundle"`` (a ``manifest.json``, or no directory: the bundle loader names what is missing) or
    ``"transformers"`` (``config.json``, no manifest); ``BundleError`` naming both for any other directory."""
    if not path.is_dir() or (path / "manifest.json").exists():
        return "bundle"
    if (path / "config.json").is_file():
        return "transformers"
    raise BundleError(
        f"{path}: neither a bundle (no manifest.json; `shira-package --base DIR --out BUNDLE` makes one) "
        f"nor a transformers model directory (no config.json); it holds {_listing(path)}"
    )


def _listing(path: Path, most: int = 8) -> str:
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return "nothing"
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def _is_module(x: Any) -> bool:
    """Whether ``x`` is a ``torch.nn.Module`` (without importing torch where it was never imported)."""
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.nn.Module)


def _need_torch(what: str) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ImportError(
            f"{what} runs on the torch backend, and torch is not installed: pip install 'shira-runtime[torch]' "
            f"(a device loads bundles without it: shira-package makes one)"
        ) from None


def _hf_generate(
    model: Any,
    ids: Any,
    mask: Any,
    max_new_tokens: int,
    sampling: Sampling,
    eos_token_id: int | list[int] | None,
) -> Any:
    import torch

    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": sampling.do_sample}
    if mask is not None:
        kwargs["attention_mask"] = mask
    if eos_token_id is not None:
        kwargs["eos_token_id"] = eos_token_id
        if getattr(model.generation_config, "pad_token_id", None) is None:
            kwargs["pad_token_id"] = eos_token_id if isinstance(eos_token_id, int) else eos_token_id[0]
    if sampling.do_sample:  # top_k=0 / top_p=1.0 switch those filters off (transformers' defaults would not)
        kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k or 0, top_p=sampling.top_p or 1.0)
    with torch.random.fork_rng(devices=[]):
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        return model.generate(ids, **kwargs)
