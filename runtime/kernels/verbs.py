"""The kernel verbs, declared once: every binding is derived from this table.

Each verb is a torch.library schema (the torch ops are defined from it, their fake impls and version bumps read
its mutation annotations), plus the two sides of the C ABI it maps to (``kernels/csrc/shira_core.h``): a
*restore* side (``weights, indices, saved, mirrors``) and an *apply* side (``weights, indices, deltas, saved,
scales, mirrors`` and one ``saturated``), each under a name prefix. The public wrappers of
``shira_runtime.kernels``, the ctypes signatures and the array checks of ``shira_runtime.kernels.core`` all
follow from it. Semantics: ``shira_runtime.kernels.reference``.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from functools import cached_property


class KernelInputError(ValueError):
    """A kernel verb was given inputs it cannot use (the message names the verb and tensor)."""


SCHEMAS = {
    "restore_": (
        "restore_(Tensor(a!)[] weights, Tensor[] indices, Tensor[] saved, bool validate=True, "
        "Tensor(b!)[]? mirrors=None, Tensor[]? runs=None, Tensor[]? orders=None) -> ()"
    ),
    "apply_": (
        "apply_(Tensor(a!)[] weights, Tensor[] indices, Tensor[] deltas, Tensor(b!)[] saved, bool validate=True, "
        "Tensor[]? scales=None, Tensor(c!)? saturated=None, Tensor(d!)[]? mirrors=None, Tensor[]? runs=None, "
        "Tensor[]? orders=None) -> ()"
    ),
    "switch_": (
        "switch_(Tensor(a!)[] out_weights, Tensor[] out_indices, Tensor[] out_saved, "
        "Tensor(b!)[] in_weights, Tensor[] in_indices, Tensor[] in_deltas, Tensor(c!)[] in_saved, "
        "bool validate=True, Tensor[]? in_scales=None, Tensor(d!)? saturated=None, "
        "Tensor(e!)[]? out_mirrors=None, Tensor(f!)[]? in_mirrors=None, Tensor[]? out_runs=None, "
        "Tensor[]? in_runs=None, Tensor[]? out_orders=None, Tensor[]? in_orders=None) -> ()"
    ),
}
# what each verb does (every binding's docstring; the exact semantics, per dtype: ``kernels.reference``'s module doc)
DOCS = {
    "restore_": (
        "In place: ``weights[t].flat[indices[t]] = saved[t]`` for every t (and their mirrors, see the module\ndoc)."
    ),
    "apply_": (
        "In place: ``saved[t] = w.flat[idx]``, then ``w.flat[idx] = dtype(fp32(saved) + delta)`` (float weights)\n"
        "or ``Q(fp32(saved) * scale[row] + delta)`` (1-byte weights, and their mirrors; see the module doc)."
    ),
    "switch_": (
        "One switch: restore the outgoing state, then apply the incoming one (which may touch the same tensors).\n"
        "``in_scales`` / ``saturated``: as ``apply_``'s, for the incoming lists; ``out_mirrors`` /\n"
        "``in_mirrors``: each list's mirrors (the module doc); ``out_runs`` / ``in_runs``: each list's runs\n"
        "(optional int64 [n, 3] per tensor: entries p .. p+n-1 hold indices f .. f+n-1; see the module doc);\n"
        "``out_orders`` / ``in_orders``: each list's mirror orders (optional, per tensor with a uint8 mirror:\n"
        "its entries by ascending transposed position, ``shira_runtime.kernels.orders``).\n\n"
        "Everything is checked before the first write, so a refused call writes nothing."
    ),
}
# (restore side's prefix, apply side's prefix), None where the verb has no such side; the C function's name
SIDES = {"restore_": ("", None), "apply_": (None, ""), "switch_": ("out_", "in_")}
C_NAMES = {"restore_": "shira_restore", "apply_": "shira_apply", "switch_": "shira_switch"}
# the names of a side's lists (and the message label of each side in a two-sided verb)
RESTORE_LISTS = ("weights", "indices", "saved", "mirrors", "runs", "orders")
APPLY_LISTS = ("weights", "indices", "deltas", "saved", "scales", "mirrors", "runs", "orders")


@dataclass(frozen=True)
class Param:
    name: str
    type: str  # "Tensor[]", "Tensor" or "bool"
    optional: bool
    mutable: bool
    default: object  # inspect.Parameter.empty when required


@dataclass(frozen=True)
class Verb:
    name: str
    schema: str
    params: tuple[Param, ...]
    restore: str | None  # prefix of the restore side's list names
    apply: str | None
    c_name: str
    doc: str

    @cached_property  # read at every call (a frozen dataclass's __dict__ takes it)
    def mutated(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params if p.mutable)

    @cached_property
    def lists(self) -> tuple[str, ...]:
        """The list parameters' names, in the schema's order."""
        return tuple(p.name for p in self.params if p.type == "Tensor[]")

    @property
    def signature(self) -> inspect.Signature:
        return inspect.Signature(
            [inspect.Parameter(p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=p.default) for p in self.params]
        )

    def bind(self, args: tuple, kwargs: dict) -> dict:
        """``{name: value}`` for every parameter (defaults filled), as a call to the verb would see them."""
        names, values = self.names, self._defaults.copy()  # every name, in order: the optional ones set
        if len(args) > len(names) or not kwargs.keys() <= values.keys():
            self.signature.bind(*args, **kwargs)  # raises the TypeError a Python call would
        values.update(zip(names, args))
        for k, v in kwargs.items():
            if self._position[k] < len(args):
                raise TypeError(f"{self.name}() got multiple values for argument {k!r}")
            values[k] = v
        for k in self._required[len(args) :]:  # required parameters come first
            if values[k] is _MISSING:
                raise TypeError(f"{self.name}() missing required argument {k!r}")
        return values

    @cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @cached_property
    def _defaults(self) -> dict:
        return {p.name: _MISSING if p.default is inspect.Parameter.empty else p.default for p in self.params}

    @cached_property
    def _required(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params if p.default is inspect.Parameter.empty)

    @cached_property
    def _position(self) -> dict[str, int]:
        return {p.name: k for k, p in enumerate(self.params)}


_MISSING = object()  # a required parameter not given yet (bind)


_PARAM = re.compile(r"(Tensor|bool)(\([a-z]!\))?(\[\])?(\?)? (\w+)(?:=(\w+))?")


def _parse(name: str, schema: str) -> Verb:
    params = []
    for m in _PARAM.finditer(schema[schema.index("(") + 1 : schema.rindex("->")]):
        base, alias, lst, opt, pname, default = m.groups()
        value = {"True": True, "False": False, "None": None, None: inspect.Parameter.empty}[default]
        params.append(Param(pname, base + (lst or ""), bool(opt), bool(alias), value))
    restore, apply = SIDES[name]
    return Verb(name, schema, tuple(params), restore, apply, C_NAMES[name], DOCS[name])


VERBS: dict[str, Verb] = {name: _parse(name, schema) for name, schema in SCHEMAS.items()}
