"""The pure-torch reference on hand-computed cases, and the SHIRA_KERNELS path switch."""

from __future__ import annotations

import pytest
import torch
from shira_runtime import kernels
from shira_runtime.kernels import KernelInputError, reference


def test_apply_restore_by_hand():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # flat [1, 2, 3, 4]
    idx = torch.tensor([1, 3], dtype=torch.int32)
    saved = torch.empty(2)
    reference.apply_([w], [idx], [torch.tensor([0.5, -1.0])], [saved])
    assert w.tolist() == [[1.0, 2.5], [3.0, 3.0]]
    assert saved.tolist() == [2.0, 4.0]
    reference.restore_([w], [idx], [saved])
    assert w.tolist() == [[1.0, 2.0], [3.0, 4.0]]


# (weight dtype, delta, expected): the fp32 sum is rounded to the weight dtype, ties to even.
ROUNDING = [
    (torch.bfloat16, 2.0**-8, 1.0),  # halfway between 1 and 1 + 2^-7: even is 1
    (torch.bfloat16, 2.0**-8 + 2.0**-20, 1.0 + 2.0**-7),  # just above halfway: up
    (torch.bfloat16, 3 * 2.0**-8, 1.0 + 2.0**-6),  # halfway between 1 + 2^-7 and 1 + 2^-6: even is 1 + 2^-6
    (torch.float16, 2.0**-11, 1.0),
    (torch.float16, 3 * 2.0**-11, 1.0 + 2.0**-9),
    (torch.float16, 1e5, float("inf")),  # overflows fp16
    (torch.float32, 2.0**-24, 1.0),  # 1 + 2^-24 is a tie in fp32: even is 1
]


@pytest.mark.parametrize("dtype, delta, expected", ROUNDING)
def test_rounding_by_hand(dtype, delta, expected):
    w = torch.ones(3, dtype=dtype)
    saved = torch.empty(1, dtype=dtype)
    reference.apply_([w], [torch.tensor([1])], [torch.tensor([delta])], [saved])
    assert w.tolist() == [1.0, expected, 1.0]
    assert saved.tolist() == [1.0]


def test_switch_by_hand_same_element():
    w = torch.tensor([10.0, 20.0, 30.0])
    saved_a, saved_b = torch.empty(2), torch.empty(1)
    reference.apply_([w], [torch.tensor([0, 1])], [torch.tensor([1.0, 2.0])], [saved_a])
    assert w.tolist() == [11.0, 22.0, 30.0]
    # B touches element 1 too: it must see the restored 20, not A's 22
    a_idx, b_idx = torch.tensor([0, 1]), torch.tensor([1])
    reference.switch_([w], [a_idx], [saved_a], [w], [b_idx], [torch.tensor([5.0])], [saved_b])
    assert w.tolist() == [10.0, 25.0, 30.0]
    assert saved_b.tolist() == [20.0]


def test_reference_refuses_out_of_range():
    w = torch.zeros(4)
    with pytest.raises(KernelInputError, match=r"apply_: tensor 0: index 4 out of range"):
        reference.apply_([w], [torch.tensor([0, 4])], [torch.ones(2)], [torch.empty(2)])
    assert w.tolist() == [0.0] * 4


def test_env_var_picks_the_path(monkeypatch):
    try:
        monkeypatch.setenv("SHIRA_KERNELS", "torch")
        kernels.reset()
        assert kernels.backend() == "torch"
        monkeypatch.setenv("SHIRA_KERNELS", "bogus")
        kernels.reset()
        with pytest.raises(ValueError, match="SHIRA_KERNELS"):
            kernels.backend()
    finally:
        monkeypatch.undo()
        kernels.reset()  # the next caller reads the real environment again
