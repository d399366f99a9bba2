"""The onnxruntime backend: an exported bundle run by one live session that reads weights we own and write.

Mechanism (measured, with the alternatives, by ``python -m benchmarks.onnx_live --alternatives``):
- the bundle's graph takes every weight as a graph *input* (``exporters.export_onnx``), so no onnxruntime
  optimizer can fold, prepack or copy it;
- the weights are C-contiguous numpy views of the bundle's weight file mapped copy-on-write
  (``shira_runtime.bundle.map_weights``: loading reads no weight; a write copies only the pages it lands on);
  ``tensors`` are those numpy arrays (no torch: the device path), so the switcher's kernels write them in
  place. Once the base is back (``switch(None)``) every page holds the file's bytes again, and the pages
  switches touched are handed back (``release``: ``madvise(MADV_DONTNEED)``), so memory returns to what it was;
- each thread has an ``IOBinding`` with every weight bound once as an ``OrtValue`` over that memory (zero
  copy: checked by pointer), so a run passes only the real inputs;
- ``MatMul(X, Transpose(W))`` (``nn.Linear`` on 3-D activations) is rewritten at load into
  ``Transpose(Gemm(W, X2d, transB=1))``: the weight is the GEMM's *A* operand, which MLAS reads in place,
  whereas as a non-constant *B* operand it would be re-packed on every run (~1.2-2x slower matmuls).
  ``GemmTransposeFusion`` is disabled so onnxruntime does not fold the output transpose back. Weights under
  ``GEMM_A_MIN`` elements are left alone: there the extra small nodes cost more than the packing saves.
  For a single token (M=1) this form is slower than a GEMV; the full-sequence graphs we export have
  M = batch x seq.
Before the first inference that follows a write to the weights (a switch; not at load, which would page every
weight in and delay the first token), a probe writes one weight, runs, checks the output changed, and restores it
bit for bit: if a future onnxruntime copies graph inputs, that inference fails loudly instead of serving stale
weights. (Before any write, a copy would hold the file's bytes: the outputs are right either way.)

Bundle files are untrusted: ``shira_runtime.bundle`` checks them, naming the file and tensor at fault (``BundleError``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import mmap
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from shira_runtime import kernels
from shira_runtime.arrays import NUMPY, as_ops, check_scales, copy_bytes
from shira_runtime.atomic import atomic_write
from shira_runtime.backend import Array, Backend
from shira_runtime.bundle import BundleError, MappedWeights, map_weights, read_bytes
from shira_runtime.errors import AdapterMismatchError, ShiraError
from shira_runtime.kernels import core as kernel_core
from shira_runtime.manifest import Manifest

GEMM_A_MIN = 1 << 16  # weight elements from which the GEMM-A rewrite pays (256 x 256)
LIVE_FILE = "live.onnx"  # the packaged live graphs (``write_live``)
ONE_ROW_FILE = "one_row.onnx"
SERIAL_MIN_RUN = 8  # pages: the shortest run advised ahead of a switch the core runs on one thread (before_write)
MADV_POPULATE_WRITE = 23  # Linux 5.14+ (<linux/mman.h>; Python's mmap module does not name it)
TRANSIENT = frozenset({errno.ENOMEM, errno.EAGAIN, errno.EINTR})  # a refused advice worth asking again later


class LiveWeightsError(ShiraError, RuntimeError):
    """The onnxruntime session does not read the weights we write (it copied them): switching would be ignored."""


class OnnxBackend(Backend):
    """Weights of an exported bundle, live in one onnxruntime session.

    ``backend(*inputs, **named)`` takes numpy arrays or torch tensors, positionally in ``input_names`` order or
    by name, and returns numpy arrays: a single array when the graph has one output (as a module returning
    one tensor does), else a list in ``output_names`` order. A decoder bundle with a KV cache called without
    the past keys/values (``input_ids`` and optionally ``attention_mask``) runs like the model's full-sequence
    forward: an empty past, positions counted over the mask, and it returns the logits alone.
    """

    kind = "onnxruntime"

    def __init__(
        self,
        bundle: Path,
        manifest: Manifest,
        arrays: dict[str, np.ndarray] | MappedWeights,
        graph: Any,
        threads: int | None = None,
        gemm_a: bool | None = None,
        spin: bool = False,
    ):
        self._map = arrays if isinstance(arrays, MappedWeights) else None  # None: weights in private memory
        arrays = dict(arrays.arrays) if self._map is not None else arrays
        self.bundle, self.manifest, self.arrays = bundle, manifest, arrays  # arrays: ONNX name -> storage
        params = manifest.parameters
        self.aliases, self.tensors, self.shapes = {}, {}, {}
        canon_of: dict[str, str] = {}
        scale_of = {n: p["quant"]["scale"] for n, p in params.items() if "quant" in p}  # int8 codes -> scales
        self.scales = {}
        for name, p in params.items():
            if name in scale_of.values():  # fixed: a switch never moves the grid (as on the torch backend)
                continue
            canon = canon_of.setdefault(p["onnx"], name)  # the first name of a tied group is canonical
            self.aliases[name] = canon
            if canon == name:
                self.tensors[name] = arrays[p["onnx"]]
                self.shapes[name] = tuple(p["shape"])
                if name in scale_of:
                    self.scales[name] = arrays[params[scale_of[name]]["onnx"]]
                    check_scales(name, self.scales[name], BundleError, f"{bundle / manifest.weights}: ")
        # An int8 weight's graph reads its transposed uint8 copy (shira_runtime.exporters.quant_graph), which is the
        # switched tensor: a uint8 weight of the kernels (code + 128, per-column scales) stored transposed, so
        # adapters' indices map to it as for any transposed weight. Bundles store it (dtype uint8, layout
        # transposed: mapped like every weight). Bundles of the u8t form store the codes instead: the copy is built
        # here and bound like every weight; the codes stay a graph input that no node reads, never written, and
        # their pages go back at load.
        by_onnx = {params[n]["onnx"]: n for n in self.tensors}
        self.u8t: dict[str, str] = {}  # canonical name of an int8 weight -> the graph input of its copy
        for u8t, (codes, _) in manifest.mirrors().items():
            arrays[u8t] = np.ascontiguousarray(u8t_copy(arrays[codes]))
            self.tensors[by_onnx[codes]] = arrays[u8t]
            self.u8t[by_onnx[codes]] = u8t
        self.transposed = frozenset(n for n in self.tensors if params[n]["layout"] == "transposed" or n in self.u8t)
        # LoRA slots (shira_runtime.exporters.lora_slots): module path -> (lora_A name, lora_B name); zero when unused
        self.lora_slots = {
            n[: -len(".lora_A")]: (n, n[: -len(".lora_A")] + ".lora_B")
            for n in self.tensors
            if n.endswith(".lora_A") and n[: -len(".lora_A")] + ".lora_B" in self.tensors
        }
        self._slots_in_use: set[str] = set()
        self.input_names = [i["name"] for i in manifest.inputs]
        self.output_names = [o["name"] for o in manifest.outputs]
        self._inputs = {i["name"]: i for i in manifest.inputs}
        live = graph if isinstance(graph, LiveGraphs) else prepare_live(graph, manifest, gemm_a)
        self._indexes = dict(live.indexed_rows)
        self.decoder = manifest.decoder or None
        self.rewritten = live.rewritten
        graph_file = live.graph_file or bundle / manifest.graph
        self.session = _session(live.graph, threads, graph_file, spin)
        manifest.check_io(graph_file, *_session_io(self.session))
        # a decoder's one-token session starts at the first one-token run (or probe), not at load: the first
        # token comes from the prefill session
        self._one_row = (live.one_row, live.one_row_file or bundle / manifest.graph, threads, spin)
        self._one_row_session = self.session if live.one_row is None else None
        self._one_row_lock = threading.Lock()
        import onnxruntime as ort

        self._values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items()}
        for n, v in self._values.items():
            if v.data_ptr() != arrays[n].ctypes.data:
                raise LiveWeightsError(f"onnxruntime copied weight {n!r} when wrapping it; it would not see switches")
        self._local = threading.local()
        self._probe_lock = threading.Lock()
        self._probe_pending = False  # open(verify=...): the live-weights probe runs before the first inference
        self._written = False  # ... that follows a write to the weights
        self._verifier = self._map.pending if self._map is not None else None  # the weights' sha256, on a thread
        self._touched: set[str] = set()  # canonical names written since the base was last released
        # pages of the map made private ahead of a switch's writes since the last release (before_write), and the
        # releases so far: a plan whose pages were made private in this generation needs nothing more
        self._private = np.zeros(-(-len(self._map.mm) // mmap.PAGESIZE), bool) if self._map is not None else None
        self._map_start = np.frombuffer(self._map.mm, np.uint8).ctypes.data if self._map is not None else 0
        self._generation = 0
        self._populate = self._map is not None and sys.platform.startswith("linux")
        if self.u8t:  # the codes were read once to build the copies and are never written: their pages go back
            self.release(list(self.u8t))

    @property
    def one_row_session(self) -> Any:
        """A decoder's one-token session (the weights as GEMM *B*), started on first use; the prefill session
        where the bundle has none. A graph onnxruntime refuses, or whose inputs differ from the manifest's, is a
        ``BundleError`` naming its file, raised by that first use."""
        if self._one_row_session is None:
            with self._one_row_lock:
                if self._one_row_session is None:
                    graph, path, threads, spin = self._one_row
                    session = _session(graph, threads, path, spin)
                    self.manifest.check_io(path, *_session_io(session))
                    self._one_row_session = session
        return self._one_row_session

    @classmethod
    def open(
        cls,
        bundle: str | Path,
        *,
        threads: int | None = None,
        verify: bool | str = True,
        gemm_a: bool | None = None,
        spin: bool = False,
    ) -> OnnxBackend:
        """Load ``bundle`` (validated), start the live session, and probe that it reads our weights.

        ``threads``: onnxruntime intra-op threads (default: its own choice, the physical cores). ``spin``: let them
        spin between parallel sections (onnxruntime's own default; off by default here: on a 2-vCPU machine an int8
        Llama-3.2-1B bundle's decode step took 28% less time without it, 33% less with the other vCPU busy,
        docs/bundles.md).
        The weight file is mapped copy-on-write. ``verify`` (default True): its sha256 is computed on a background
        thread (reading the file, not the map) while the session starts and the first inference runs, and that
        inference's outputs are returned only once it matched: a mismatch raises ``BundleError`` there, and from
        every later inference (``verified()`` waits for it and raises it too); ``verify="load"``: computed here,
        before anything is mapped (a mismatch fails the load). Either way the live-weights probe runs before the
        first inference that follows a write to the weights (``check_live``). ``verify=False`` skips both
        (less safety).
        ``gemm_a``: the weight-as-GEMM-A rewrite for every eligible weight (True), none (False), or only for
        weights of at least ``GEMM_A_MIN`` elements (None, the default).
        """
        bundle = Path(bundle)
        manifest = Manifest.read(bundle)
        graph = _read_checked(bundle / manifest.graph, manifest.graph_sha256)
        live = manifest.live
        if live and gemm_a is None and live["gemm_a_min"] == GEMM_A_MIN:  # prepared by the packager: no onnx
            one_row = bundle / live["one_row"] if live["one_row"] else None
            graph = LiveGraphs(
                _read_checked(bundle / live["graph"], live["graph_sha256"]),
                _read_checked(one_row, live["one_row_sha256"]) if one_row is not None else None,
                live["rewritten"],
                live["indexed_rows"],
                bundle / live["graph"],
                one_row,
            )
        else:
            graph = _parse_graph(bundle / manifest.graph, graph, gemm_a, bool(live))
        if verify not in (True, False, "load"):
            raise ValueError(f"verify must be True, 'load' or False, got {verify!r}")
        weights = map_weights(
            bundle / manifest.weights,
            manifest.storage(),
            manifest.weights_sha256 if verify else None,
            background=verify is True,
        )
        backend = cls(bundle, manifest, weights, graph, threads, gemm_a, spin)
        backend._probe_pending = bool(verify)
        return backend

    def verified(self) -> None:
        """Wait until the weight file's background sha256 check (``open(verify=True)``) is done; raise its
        ``BundleError`` if the file does not match the manifest. Inference calls this before returning outputs."""
        v = self._verifier
        if v is not None:
            v.wait()  # raises on a mismatch, each time: the verifier stays, so every inference refuses
            self._verifier = None

    # -- memory: pages of the mapped weight file --
    @property
    def mapped(self) -> bool:
        """Whether the weights are views of the mapped file (False: read into private memory)."""
        return self._map is not None

    def after_switch(self, active: tuple, written: set[str]) -> None:
        """Once the base is back (``active == ()``), hand back the pages of every tensor written since the last
        time: exact revert left each of their bytes equal to the file's."""
        self._touched |= written
        self._written = self._written or bool(written)
        if not active and self._touched:
            self.release(self._touched)
            self._touched = set()

    def before_write(self, names: tuple[str, ...], indices: Any, cache: dict) -> None:
        """Make the pages of the mapped file that entries ``indices`` of tensors ``names`` land on private now, on
        this thread, with ``madvise(MADV_POPULATE_WRITE)`` over each run of them (Linux 5.14+), rather than let the
        kernels' writes fault them in one by one: those faults, taken by the core's two threads at once, contend
        in the kernel's page handling. On the machine of docs/device.md a switch of 1 M random entries from the
        base of an int8 bundle took 183-188 ms that way, 34 ms to make its 24,415 pages private here and 3.1-3.4 ms
        to switch after (``python -m benchmarks.scaling --from-base``). Only pages not yet made private since the
        last release are advised; a plan whose pages were, in this generation, costs a lookup. A switch the core
        runs on the calling thread has only its runs of ``SERIAL_MIN_RUN`` pages or more advised: there a short
        run's faults cost what its advice would (10,000 entries in blocks: 0.77 ms faulting, 0.85 ms advising
        each run of two pages or more).
        The bytes are unchanged (the file's, copied): a switch that fails after this leaves them as they were, and
        the pages go back with the next release (``names`` count as written). Nothing for weights in private
        memory. A refused advice leaves the writes to fault the pages in, as before; it is not asked again unless
        the refusal was transient (``TRANSIENT``: short of memory, interrupted), so an older kernel (EINVAL) or a
        file system without it costs one refusal."""
        if not self._populate or cache.get("generation") == self._generation:
            return
        pages = cache.get("pages")
        if pages is None:  # once per plan: its pages, those in runs of SERIAL_MIN_RUN or more on one thread
            pages = self._pages_of(names, indices)
            if pages.size and not self._threaded(indices):  # a short run's advice costs what its faults cost
                firsts, lasts = _runs(pages)
                keep = lasts - firsts + 1 >= SERIAL_MIN_RUN
                pages = np.concatenate([pages[:0], *(np.arange(a, b + 1) for a, b in zip(firsts[keep], lasts[keep]))])
            cache["pages"] = pages
        need = pages[~self._private[pages]]
        if need.size:
            self._touched.update(names)
            firsts, lasts = _runs(need)
            mm, page = self._map.mm, mmap.PAGESIZE
            for lo, hi in zip(firsts.tolist(), lasts.tolist()):
                try:
                    mm.madvise(MADV_POPULATE_WRITE, lo * page, (hi + 1 - lo) * page)
                except OSError as exc:  # the writes fault the pages in; asked again later only after a transient
                    self._populate = exc.errno in TRANSIENT  # EINVAL (before 5.14) and the rest: not again
                    return
                self._private[lo : hi + 1] = True
        cache["generation"] = self._generation

    @staticmethod
    def _threaded(indices: Any) -> bool:
        """Whether the kernels will write ``indices`` on the core's threads (the incoming entries alone: those
        of a switch from the base)."""
        return kernels.backend() == "cpp" and kernel_core.threaded(sum(len(i) for i in indices))

    def _pages_of(self, names: tuple[str, ...], indices: Any) -> np.ndarray:
        """The distinct pages of the map (sorted page numbers) that entries ``indices`` of ``names`` lie in; none
        for a tensor in private memory (an int8 bundle's copy built at load)."""
        mm, start = self._map.mm, self._map_start
        shift = mmap.PAGESIZE.bit_length() - 1
        out = []
        for n, idx in zip(names, indices):
            w = self.tensors[n]
            offset = w.ctypes.data - start
            if not 0 <= offset < len(mm) or not len(idx):
                continue
            p = (np.asarray(idx, np.int64) * w.itemsize + offset) >> shift  # sorted indices: ascending pages
            first = np.empty(p.size, bool)
            first[0] = True
            np.not_equal(p[1:], p[:-1], out=first[1:])
            out.append(p[first])
        return np.unique(np.concatenate(out)) if out else np.empty(0, np.int64)

    def release(self, names: set[str] | list[str], check: bool = False) -> int:
        """Drop this process's private copies of the pages under tensors ``names`` (canonical names; each span
        rounded out to whole pages): the next read maps the file's page again, so every byte of those pages must
        equal the file's (the caller's guarantee, or, with ``check``, compared with the file first and skipped
        where not). Linux only; for weights read into private memory, nothing. Returns the bytes advised."""
        if self._map is None or not sys.platform.startswith("linux"):
            return 0
        mm, page = self._map.mm, mmap.PAGESIZE
        ranges = []
        for n in names:
            span = self._map.spans.get(self.manifest.parameters[n]["onnx"])
            if span is not None and span[1]:
                start, nbytes = span
                ranges.append((start // page * page, min(-(-(start + nbytes) // page) * page, len(mm))))
        merged: list[list[int]] = []
        for lo, hi in sorted(ranges):
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        total = 0
        with open(self.bundle / self.manifest.weights, "rb") if check else contextlib.nullcontext() as f:
            for lo, hi in merged:
                if f is not None and os.pread(f.fileno(), hi - lo, lo) != mm[lo:hi]:
                    continue
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)  # the kernel rounds the length up to the last page
                total += hi - lo
        self._private[:] = False  # conservative where a checked range was kept: it is only advised again
        self._generation += 1
        return total

    # -- unfused LoRA, written into the bundle's LoRA slots --
    def check_unfused(self, tensor: str, adapter: str) -> str:
        module = tensor[: -len(".weight")] if tensor.endswith(".weight") else tensor
        if module not in self.lora_slots:
            raise AdapterMismatchError(
                f"adapter {adapter!r}: this bundle has no LoRA slot for {tensor!r}; export it with "
                f"export_onnx(..., lora_rank=R) to run LoRA unfused on onnxruntime"
            )
        return module

    def check_unfused_plan(self, entries: list[tuple[str, Array, Array, float]]) -> None:
        ranks: dict[str, int] = {}
        for module, a, _, _ in entries:
            ranks[module] = ranks.get(module, 0) + int(a.shape[0])
        for module, r in ranks.items():
            cap = self.shapes[self.lora_slots[module][0]][0]
            if r > cap:
                raise AdapterMismatchError(
                    f"module {module!r}: the unfused LoRA adapters need rank {r}, its slot holds {cap}"
                )

    def set_unfused(self, entries: list[tuple[str, Array, Array, float]]) -> None:
        by_module: dict[str, list] = {}
        for module, a, b, alpha in entries:
            by_module.setdefault(module, []).append((a, b, alpha))
        stale = self._slots_in_use - set(by_module)
        self._written = True
        self._touched |= {n for m in (*stale, *by_module) for n in self.lora_slots[m]}
        self._slots_in_use |= set(by_module)  # first: a write cut short leaves every touched slot on record
        for module in stale:
            for n in self.lora_slots[module]:
                self.tensors[n][...] = 0
        for module, terms in by_module.items():  # several adapters on one linear: their ranks side by side
            sa, sb = (self.logical(n) for n in self.lora_slots[module])
            sa[...] = 0
            sb[...] = 0
            r = 0
            for a, b, alpha in terms:  # b * alpha in b's dtype, then cast to the slot's (as torch's copy_)
                sa[r : r + a.shape[0]] = as_ops(a, NUMPY)
                sb[:, r : r + a.shape[0]] = as_ops(b * alpha, NUMPY)
                r += a.shape[0]
        self._slots_in_use = set(by_module)

    # -- inference --
    def __call__(self, *inputs: Any, **named: Any) -> np.ndarray | list[np.ndarray]:
        self._ready()
        out = self._run(*inputs, **named)
        self.verified()
        return out

    def _ready(self) -> None:
        """The live-weights probe, once, before the first inference that follows a write to the weights;
        concurrent callers wait for it (it writes weights). A failed probe stays pending: every inference after
        a write raises it."""
        if self._probe_pending and self._written:
            with self._probe_lock:
                if self._probe_pending:
                    self.check_live()
                    self._probe_pending = False

    def _run(self, *inputs: Any, **named: Any) -> np.ndarray | list[np.ndarray]:
        past_given = bool(self.decoder) and any(n in named for n in self._past_names())
        feed = self._feed(inputs, named)
        session = self._session_for(feed)
        binding = self._binding(session)
        for name, a in feed.items():
            binding.bind_cpu_input(name, a)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        outs = binding.copy_outputs_to_cpu()
        if self.decoder is not None and not past_given and len(inputs) < len(self.input_names):
            return outs[self.output_names.index(self.decoder["logits"])]  # a full-sequence forward: its logits
        return outs[0] if len(outs) == 1 else list(outs)

    def step(self, ids: np.ndarray, mask: np.ndarray, cache: list[Any] | None) -> tuple[np.ndarray, list[Any]]:
        """One decoder run for generation: ``ids`` ``[B, S]`` after a past of ``cache`` (the previous run's
        present keys/values, onnxruntime ``OrtValue``s passed on without a copy; None: an empty past), ``mask``
        ``[B, past + S]``. Returns the last position's logits ``[B, V]`` and this run's present keys/values."""
        self._ready()
        d = self.decoder
        feed = self.step_feed(ids, mask, empty_past=cache is None)
        session = self._session_for(feed)
        binding = self._binding(session)
        for name, a in feed.items():
            binding.bind_cpu_input(name, self._array(name, a))
        for (past_k, past_v, _, _), k, v in zip(d["cache"], (cache or [])[0::2], (cache or [])[1::2]):
            binding.bind_ortvalue_input(past_k, k)
            binding.bind_ortvalue_input(past_v, v)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        outs = dict(zip(self.output_names, binding.get_outputs()))
        self.verified()
        return outs[d["logits"]].numpy()[:, -1], [outs[n] for layer in d["cache"] for n in layer[2:]]

    def step_feed(self, ids: np.ndarray, mask: np.ndarray, empty_past: bool) -> dict[str, np.ndarray]:
        """A generation step's inputs but the past: ids, mask, positions counted over the mask, the last
        position's logits only; with ``empty_past``, a past of length 0 (the prefill)."""
        d = self.decoder
        if d is None:
            raise TypeError(f"{self.bundle}: this bundle has no KV cache (export a decoder with kv_cache=True)")
        feed = {d["input_ids"]: ids, d["attention_mask"]: mask}
        if d.get("position_ids"):
            feed[d["position_ids"]] = positions(mask, ids.shape[1])
        if d.get("logits_to_keep"):
            feed[d["logits_to_keep"]] = np.array([ids.shape[1] - 1], np.int64)
        return feed | (self._empty_past(ids.shape[0]) if empty_past else {})

    def _session_for(self, feed: dict[str, Any]) -> Any:
        """The one-row session (weights as GEMM *B*: a GEMV reads them in place) when one token runs, else the
        prefill session (weights as GEMM *A*)."""
        if self.decoder is not None and np.size(feed[self.decoder["input_ids"]]) == 1:
            return self.one_row_session
        return self.session

    def _binding(self, session: Any) -> Any:
        bindings = getattr(self._local, "bindings", None)
        if bindings is None:  # per thread: a binding is not shared between concurrent runs
            bindings = self._local.bindings = {}
        b = bindings.get(id(session))
        if b is None:
            b = session.io_binding()
            for name, v in self._values.items():
                b.bind_ortvalue_input(name, v)
            bindings[id(session)] = b
        return b

    def _feed(self, inputs: tuple, named: dict) -> dict[str, np.ndarray]:
        if len(inputs) > len(self.input_names):
            raise TypeError(f"the graph takes {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        feed = dict(zip(self.input_names, inputs))
        for k, v in named.items():
            if k not in self._inputs:
                raise TypeError(f"unknown input {k!r}; the graph's inputs are {self.input_names}")
            if k in feed:
                raise TypeError(f"input {k!r} given twice")
            feed[k] = v
        if self.decoder is not None:
            feed = self._decoder_defaults(feed)
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise TypeError(f"missing inputs {missing}; the graph's inputs are {self.input_names}")
        return {n: self._array(n, feed[n]) for n in self.input_names}

    def _decoder_defaults(self, feed: dict[str, Any]) -> dict[str, Any]:
        """A decoder bundle called with ``input_ids`` (and optionally a mask) runs like the model's full-sequence
        forward: an empty past, a mask of ones, positions counted over the mask, every position's logits."""
        d = self.decoder
        if d["input_ids"] not in feed:
            return feed
        ids = np.asarray(feed[d["input_ids"]])
        if ids.ndim != 2:
            return feed  # _array names the shape at fault
        pasts = self._past_names()
        given = [n for n in pasts if n in feed]
        if given and len(given) != len(pasts):
            missing = sorted(set(pasts) - set(given))
            raise TypeError(f"give every past key/value of the cache or none; missing {missing}")
        feed = dict(feed)
        if not given:
            feed |= self._empty_past(ids.shape[0])
        past = np.shape(feed[pasts[0]])[2] if np.ndim(feed[pasts[0]]) == 4 else 0
        if feed.get(d["attention_mask"]) is None:
            feed[d["attention_mask"]] = np.ones((ids.shape[0], past + ids.shape[1]), np.int64)
        if d.get("position_ids") and feed.get(d["position_ids"]) is None:
            feed[d["position_ids"]] = positions(np.asarray(feed[d["attention_mask"]]), ids.shape[1])
        if d.get("logits_to_keep") and feed.get(d["logits_to_keep"]) is None:
            feed[d["logits_to_keep"]] = np.arange(ids.shape[1], dtype=np.int64)
        return feed

    def _empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """Past keys/values of length 0 for ``batch`` rows (the prefill's)."""
        empty = {}
        for name in self._past_names():
            spec = self._inputs[name]
            _, heads, _, dim = spec["shape"]
            empty[name] = np.zeros((batch, heads, 0, dim), np.dtype(spec["dtype"]))
        return empty

    def _array(self, name: str, x: Any) -> np.ndarray:
        spec = self._inputs[name]
        if not isinstance(x, np.ndarray) and hasattr(x, "detach"):  # a torch tensor
            x = x.detach().cpu().numpy()
        x = np.asarray(x)
        want = np.dtype(spec["dtype"])
        if x.dtype != want:
            if x.dtype.kind != want.kind:
                raise TypeError(f"input {name!r}: dtype {x.dtype}, the graph takes {want}")
            x = x.astype(want)
        dims = spec["shape"]
        if x.ndim != len(dims) or any(isinstance(d, int) and d != s for d, s in zip(dims, x.shape)):
            raise ValueError(f"input {name!r}: shape {list(x.shape)}, the graph takes {dims}")
        return np.ascontiguousarray(x)

    # -- the live-weights check --
    def probe_inputs(self, seed: int = 0) -> dict[str, np.ndarray]:
        """Non-degenerate inputs of the manifest's example shapes: floats ~ N(0, 1); integer inputs that index a
        table (``Gather`` of a weight: token or position ids) drawn from ``[1, rows)``, away from a padding row
        0; other integer or boolean inputs (masks) all ones."""
        gen = np.random.default_rng(seed)
        feed = {}
        for i in self.manifest.inputs:
            shape, dtype = i["example_shape"], np.dtype(i["dtype"])
            rows = self._indexes.get(i["name"])
            if dtype.kind == "f":
                feed[i["name"]] = gen.standard_normal(shape).astype(dtype)
            elif rows is not None and rows > 1:
                feed[i["name"]] = gen.integers(1, rows, shape).astype(dtype)
            else:
                feed[i["name"]] = np.ones(shape, dtype)
        return feed

    def check_live(self) -> None:
        """Write a probe into each weight in turn (small matrices first), run, and stop once the outputs moved,
        after restoring it bit for bit; raise if no weight moves them (the session does not read our memory).
        A decoder's one-token session is probed too (a one-token run of the probe inputs)."""
        feeds = [self.probe_inputs()]
        if self.decoder is not None:
            one = {k: v[:1] for k, v in feeds[0].items() if k in self._past_names()}
            one[self.decoder["input_ids"]] = feeds[0][self.decoder["input_ids"]][:1, :1]
            feeds.append(one)
        before = [self._outputs(f) for f in feeds]
        moved = [False] * len(feeds)
        tried = []
        slots = {self.manifest.parameters[n]["onnx"] for pair in self.lora_slots.values() for n in pair}
        # int8 codes with a transposed copy are read by no node (the copy is, and is probed): probing them first
        # cost one run each (SmolLM2's int8 bundle: 60 runs, 13 s before its first token after a switch)
        unread = {self.manifest.parameters[n]["onnx"] for n in self.u8t}
        skip = slots | unread
        for name in _probe_order({n: a for n, a in self.arrays.items() if n not in skip}):  # zero slots: no effect
            a = self.arrays[name]
            saved = a.copy()
            try:
                probe = (1, 2) if a.dtype.kind in "iu" else (0.25, -0.25)  # int8 codes take integers
                a[...] = np.where(a == probe[0], probe[1], probe[0]).astype(a.dtype)  # every element changes
                probed = [self._outputs(f) for f in feeds]
            finally:
                a[...] = saved
            if not np.array_equal(saved.view(np.uint8), a.view(np.uint8)):
                raise LiveWeightsError(f"weight {name!r} was not restored bit for bit after the probe")
            names = [n for n, p in self.manifest.parameters.items() if p["onnx"] == name][:1]
            if not self.release(names, check=True):  # a page it shares with an adapter's writes: at switch(None)
                self._touched.update(names)
            changed = [not _same(b, p) for b, p in zip(before, probed)]
            if any(changed):
                if not all(_same(b, self._outputs(f)) for b, f in zip(before, feeds)):
                    raise LiveWeightsError(f"{self.bundle}: outputs did not come back after restoring {name!r}")
                moved = [m or c for m, c in zip(moved, changed)]
                if all(moved):
                    return
            tried.append(name)
        more = f" (and {len(tried) - 3} more)" if len(tried) > 3 else ""
        which = ""
        if any(moved):  # one of a decoder's two sessions reads our memory, the other does not
            which = " in the one-token session" if moved[0] else " in the prefill session"
        raise LiveWeightsError(
            f"{self.bundle}: writing weights {tried[:3]}{more} did not change the outputs{which}: this onnxruntime "
            f"({_ort_version()}) does not read the weight buffers live (copied or constant-folded them)"
        )

    def _past_names(self) -> list[str]:
        return [n for layer in self.decoder["cache"] for n in layer[:2]] if self.decoder else []

    def _outputs(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        out = self._run(**feed)
        return [out] if isinstance(out, np.ndarray) else out


def _same(xs: list[np.ndarray], ys: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y, equal_nan=True) for x, y in zip(xs, ys))


def positions(mask: np.ndarray, seq: int) -> np.ndarray:
    """Position ids of the last ``seq`` tokens, counted over ``mask`` ``[batch, past + seq]`` like transformers'
    ``generate``: padding (mask 0) does not advance the count, and padded slots get position 1."""
    pos = np.cumsum(mask != 0, axis=-1, dtype=np.int64) - 1
    pos[mask == 0] = 1
    return np.ascontiguousarray(pos[:, -seq:])


def u8t_copy(codes: np.ndarray) -> np.ndarray:
    """What an int8 bundle's graph reads for 2-D int8 codes ``[out, in]``: uint8 ``[in, out]``, ``code ^ 0x80``
    (``code + 128``, zero point 128) transposed (a view; ``shira_runtime.exporters.quant_graph``; the tensor the
    switch writes, ``OnnxBackend.u8t``)."""
    return copy_bytes(codes).T


@dataclass(frozen=True)
class LiveGraphs:
    """What the live sessions run, prepared from the bundle's graph (``prepare_live``): the serialized graphs
    (full sequences; one-row decode steps, or None), how many linears were rewritten, and the rows of the weight
    each id input indexes (``Gather``). A packaged bundle carries them (``LIVE_FILE``, ``ONE_ROW_FILE``), so
    loading needs no ``onnx`` package."""

    graph: bytes
    one_row: bytes | None
    rewritten: int
    indexed_rows: dict[str, int]
    # the files they were read from, named by errors (None: prepared here from the bundle's graph file)
    graph_file: Path | None = None
    one_row_file: Path | None = None


def prepare_live(model: Any, manifest: Manifest, gemm_a: bool | None = None) -> LiveGraphs:
    """The live graphs of a bundle's ONNX ``model`` (an ``onnx.ModelProto``, left untouched): the GEMM-A rewrite
    of ``gemm_a``'s weights (the module doc), the logits projection and every linear of the one-row graph in the
    prepacked B form. Needs the ``onnx`` package (the packager's side)."""
    graph = type(model)()
    graph.CopyFrom(model)
    shapes = {n: tuple(shape) for n, (_, shape) in manifest.storage().items()}
    shapes |= {n: tuple(shape) for n, (_, shape) in manifest.mirrors().items()}  # the transposed uint8 copies
    names = set(shapes)
    one_row = None
    if manifest.decoder:  # one-token steps get their own session over the same buffers
        one_row = type(graph)()
        one_row.CopyFrom(graph)
        rewrite_linears(one_row, names, 0, weight_operand="B")
    min_elements = {None: GEMM_A_MIN, True: 0, False: None}[gemm_a]
    # the logits projection of a decoder that keeps only the positions it is asked for sees one row per
    # prompt in a prefill too: it takes the one-row form in both sessions
    head = _logits_weights(graph, manifest.decoder, names) if manifest.decoder else set()
    rewritten = 0
    if min_elements is not None:
        rewritten = rewrite_linears(graph, names - head, min_elements)
        rewritten += rewrite_linears(graph, head, 0, weight_operand="B")
    inputs = {i["name"] for i in manifest.inputs}
    return LiveGraphs(
        graph.SerializeToString(),
        one_row.SerializeToString() if one_row is not None else None,
        rewritten,
        {n: rows for n, rows in _indexed_rows(model, shapes).items() if n in inputs},
    )


def write_live(out: Path, model: Any, manifest: Manifest) -> dict:
    """Write ``model``'s default live graphs into bundle ``out``; returns the manifest's ``live`` entry."""
    live = prepare_live(model, manifest)
    entry = {"graph": LIVE_FILE, "one_row": None, "one_row_sha256": None}
    atomic_write(out / LIVE_FILE, lambda p: p.write_bytes(live.graph))
    entry["graph_sha256"] = hashlib.sha256(live.graph).hexdigest()
    if live.one_row is not None:
        atomic_write(out / ONE_ROW_FILE, lambda p: p.write_bytes(live.one_row))
        entry |= {"one_row": ONE_ROW_FILE, "one_row_sha256": hashlib.sha256(live.one_row).hexdigest()}
    return entry | {"gemm_a_min": GEMM_A_MIN, "rewritten": live.rewritten, "indexed_rows": live.indexed_rows}


def _read_checked(path: Path, sha256: str) -> bytes:
    raw = read_bytes(path)
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise BundleError(f"{path}: sha256 differs from the manifest's fingerprint (edited or corrupted)")
    return raw


def _parse_graph(path: Path, raw: bytes, gemm_a: bool | None, prepared: bool) -> Any:
    """The bundle's graph as an ``onnx.ModelProto``, to prepare its live graphs here (needs ``onnx``)."""
    try:
        import onnx
    except ImportError:
        why = f"gemm_a={gemm_a!r} differs from the packaged graphs'" if prepared else "it has no prepared live graph"
        raise BundleError(
            f"{path.parent}: {why} (a bundle packaged by an older version), so the live graph must be prepared "
            f"at load, which needs the `onnx` package: pip install onnx, or re-package the bundle"
        ) from None
    try:
        return onnx.load_from_string(raw)
    except Exception as exc:
        raise BundleError(f"{path}: not a readable ONNX model ({exc})") from None


_ORT_TYPES = {"float": "float32", "double": "float64"}


def _runs(pages: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first and last page of each run of consecutive numbers in sorted, distinct, non-empty ``pages``."""
    ends = np.flatnonzero(np.diff(pages) != 1)  # the last page of each run but the last
    firsts, lasts = np.empty(ends.size + 1, pages.dtype), np.empty(ends.size + 1, pages.dtype)
    firsts[0], firsts[1:], lasts[:-1], lasts[-1] = pages[0], pages[ends + 1], pages[ends], pages[-1]
    return firsts, lasts


def _session_io(session: Any) -> tuple[list, list, list]:
    """A session's inputs and outputs as ``(name, numpy dtype name, dims)`` (a dim not fixed: None), and the
    names of its overridable initializers (inputs with an embedded value)."""

    def typed(v: Any) -> tuple[str, str, list]:
        t = v.type
        dtype = _ORT_TYPES.get(t[7:-1], t[7:-1]) if t.startswith("tensor(") else "?"
        return v.name, dtype, [d if isinstance(d, int) else None for d in (v.shape or [])]

    inits = [i.name for i in session.get_overridable_initializers()]
    return [typed(v) for v in session.get_inputs()], [typed(v) for v in session.get_outputs()], inits


def _session(graph: bytes, threads: int | None, path: Path, spin: bool = False) -> Any:
    """A session over ``graph`` that reads its weight inputs where we bind them: no prepacking (it would copy
    them), no ``GemmTransposeFusion`` (it would fold the GEMM-A form's output transpose back); intra-op threads
    that sleep between parallel sections unless ``spin``. A graph onnxruntime refuses is a ``BundleError`` naming
    ``path``, the file it came from."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.disable_prepacking", "1")
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if threads:
        opts.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(
            graph, opts, providers=["CPUExecutionProvider"], disabled_optimizers=["GemmTransposeFusion"]
        )
    except Exception as exc:  # onnxruntime's own errors (InvalidArgument, Fail, ...): an unusable graph
        raise BundleError(f"{path}: onnxruntime cannot load the graph ({exc})") from None


# -- the live graph --
def rewrite_linears(model: Any, weights: set[str], min_elements: int = 0, weight_operand: str = "A") -> int:
    """Rewrite ``Y = MatMul(X, Transpose(W))`` (W a 2-D weight input of ``min_elements`` or more, X [..., K])
    in place; return how many. ``weight_operand="A"`` (the live form):
    ``Y = Reshape(Transpose(Gemm(W, Reshape(X, [-1, K]), transB=1)), [*X.shape[:-1], N])``;
    ``"B"`` (for a prepacked session: onnxruntime packs W straight from its stored layout, with no folded
    transposed copy): ``Y = Reshape(Gemm(Reshape(X, [-1, K]), W, transB=1), [*X.shape[:-1], N])``."""
    if weight_operand not in ("A", "B"):
        raise ValueError(f"weight_operand must be 'A' or 'B', got {weight_operand!r}")
    from onnx import helper, numpy_helper

    graph = model.graph
    info = {v.name: v.type.tensor_type for v in graph.input if v.name in weights}
    shapes = {n: [d.dim_value for d in tt.shape.dim] for n, tt in info.items()}
    producer = {o: n for n in graph.node for o in n.output}

    def transposed_weight(name: str) -> str | None:
        """The weight W if ``name`` is ``Transpose(W)``, seen through Identity and no-op Cast nodes."""
        node = producer.get(name)
        while node is not None and node.op_type in ("Identity", "Cast"):
            if node.op_type == "Cast":
                src = producer.get(node.input[0])
                w = src.input[0] if src is not None and src.op_type == "Transpose" else None
                to = next((a.i for a in node.attribute if a.name == "to"), None)
                if w not in info or to != info[w].elem_type:
                    return None
            node = producer.get(node.input[0])
        if node is None or node.op_type != "Transpose" or node.input[0] not in info:
            return None
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        shape = shapes[node.input[0]]
        return node.input[0] if perm == [1, 0] and len(shape) == 2 and math.prod(shape) >= min_elements else None

    nodes, count = [], 0
    for node in graph.node:
        w = transposed_weight(node.input[1]) if node.op_type == "MatMul" else None
        if w is None:
            nodes.append(node)
            continue
        x, y = node.input[0], node.output[0]
        n_out, k = shapes[w]
        p = f"{y}::live"

        def const(name: str, values: list[int]) -> Any:
            return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array(values, np.int64)))

        if weight_operand == "A":
            gemm = [
                helper.make_node("Gemm", [w, p + "/x2d"], [p + "/yt"], transB=1),  # [N, M]: W read in place
                helper.make_node("Transpose", [p + "/yt"], [p + "/y2d"], perm=[1, 0]),
            ]
        else:
            gemm = [helper.make_node("Gemm", [p + "/x2d", w], [p + "/y2d"], transB=1)]  # [M, N]
        nodes += [
            const(p + "/k", [-1, k]),
            const(p + "/zero", [0]),
            const(p + "/last", [-1]),
            const(p + "/n", [n_out]),
            helper.make_node("Reshape", [x, p + "/k"], [p + "/x2d"]),
            *gemm,
            helper.make_node("Shape", [x], [p + "/xshape"]),
            helper.make_node("Slice", [p + "/xshape", p + "/zero", p + "/last"], [p + "/lead"]),
            helper.make_node("Concat", [p + "/lead", p + "/n"], [p + "/yshape"], axis=0),
            helper.make_node("Reshape", [p + "/y2d", p + "/yshape"], [y]),
        ]
        count += 1
    while True:  # drop the Transpose/Cast/Identity chains nothing reads any more
        used = {i for n in nodes for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in nodes if n.op_type in ("Transpose", "Cast", "Identity") and n.output[0] not in used]
        if not dead:
            break
        nodes = [n for n in nodes if all(n is not d for d in dead)]
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def _logits_weights(model: Any, decoder: dict, weights: set[str]) -> set[str]:
    """The weight of the projection that makes a decoder's logits (``MatMul`` reached back from the logits
    output through reshapes and casts), where the graph computes only the positions in ``logits_to_keep``."""
    if not decoder.get("logits_to_keep"):
        return set()
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer.get(decoder["logits"])
    while node is not None and node.op_type in ("Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze"):
        node = producer.get(node.input[0])
    if node is None or node.op_type != "MatMul":
        return set()
    src = producer.get(node.input[1])
    while src is not None and src.op_type in ("Transpose", "Cast", "Identity"):
        if src.input[0] in weights:
            return {src.input[0]}
        src = producer.get(src.input[0])
    return set()


def _indexed_rows(model: Any, shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Graph input -> rows of the weight it indexes, for inputs read by ``Gather(weight, input)`` (ids)."""
    rows: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) == 2 and node.input[0] in shapes:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            shape = shapes[node.input[0]]
            n = shape[axis] if -len(shape) <= axis < len(shape) else 0
            rows[node.input[1]] = min(rows.get(node.input[1], n), n)
    return rows


def _probe_order(arrays: dict[str, np.ndarray]) -> list[str]:
    """Small matrices first (cheap to save and likely read by a GEMM), then the rest by size."""
    return sorted(arrays, key=lambda n: (arrays[n].ndim != 2, arrays[n].size))


def _ort_version() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"
