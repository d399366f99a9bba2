"""``Verb.bind`` (every binding's argument parsing, on each kernel call) against ``inspect.Signature.bind``: the
same values in the schema's order with the defaults filled, and a TypeError wherever a Python call would raise
one."""

from __future__ import annotations

import inspect
import random

import pytest
from shira_runtime.kernels.verbs import VERBS


def _signature_bind(verb, args: tuple, kwargs: dict) -> dict:
    bound = verb.signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


@pytest.mark.parametrize("name", sorted(VERBS))
def test_bind_agrees_with_the_signature(name):
    verb = VERBS[name]
    names = [p.name for p in verb.params]
    rng = random.Random(0)
    cases = [((), {}), (tuple(range(len(names) + 1)), {}), ((), {"nope": 1})]
    for _ in range(300):
        n_pos = rng.randrange(len(names) + 1)
        args = tuple(f"a{k}" for k in range(n_pos))
        pool = names + ["bogus"]
        kwargs = {k: f"k{k}" for k in rng.sample(pool, rng.randrange(len(pool) + 1))}
        cases.append((args, kwargs))
    raised = agreed = 0
    for args, kwargs in cases:
        try:
            want = _signature_bind(verb, args, kwargs)
        except TypeError:
            with pytest.raises(TypeError):
                verb.bind(args, kwargs)
            raised += 1
            continue
        got = verb.bind(args, kwargs)
        assert list(got) == names  # every parameter, in the schema's order (the ops take them positionally)
        assert got == want
        agreed += 1
    assert raised and agreed  # both kinds of case were drawn


def test_bind_names_what_is_missing_or_given_twice():
    verb = VERBS["switch_"]
    with pytest.raises(TypeError, match="missing required argument 'in_saved'"):
        verb.bind(tuple(range(6)), {})
    with pytest.raises(TypeError, match="multiple values for argument 'out_weights'"):
        verb.bind(tuple(range(7)), {"out_weights": 0})
    assert inspect.Parameter.empty not in verb.bind(tuple(range(7)), {}).values()
