"""Results reused for calls with equal inputs (lib_multilora/reuse.py): given back only for inputs equal value for
value, as copies, whatever callers do to what they passed or got. Shown with Mikubill's ControlNet in the real webui
(tests/webui/test_neighbours.py)."""

from __future__ import annotations

import torch

from lib_multilora.reuse import ReusedCalls, equal


class Control(torch.nn.Module):
    """Stands in for a control model: a list of outputs from an input, a hint and keywords; counts its runs."""

    def __init__(self) -> None:
        super().__init__()
        self.runs = 0

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, y: object = None) -> list:
        self.runs += 1
        return [x * 2 + hint.mean(), x + timesteps.view(-1, 1)]


def test_equal_inputs_reuse_the_result_and_other_inputs_run_again() -> None:
    control = Control()
    reused = ReusedCalls(control.forward)
    x, hint, t = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([1.0, 2.0])
    first = reused(x, hint=hint, timesteps=t)
    again = reused(x.clone(), hint=hint.clone(), timesteps=t.clone())  # equal values, other tensors (a new pass)
    assert control.runs == 1 and (reused.computed, reused.reused) == (1, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    reused(x, hint=hint, timesteps=t + 1)  # the next step
    reused(x, hint=hint, timesteps=t, y=0)
    assert control.runs == 3


def test_what_callers_change_in_place_never_reaches_a_reuse() -> None:
    control = Control()
    reused = ReusedCalls(control.forward)
    x, hint, t = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([1.0, 2.0])
    expected = [out.clone() for out in control.forward(x, hint, t)]
    first = reused(x, hint, t)
    first[0].mul_(0)  # a caller scales its control in place
    x_before = x.clone()
    x.add_(1)  # and changes its input after the call
    assert control.runs == 2
    reused(x_before, hint, t)
    assert control.runs == 2, "the input as it was at the call is what matches"
    assert all(torch.equal(a, b) for a, b in zip(reused(x_before, hint, t), expected, strict=True))
    reused(x, hint, t)
    assert control.runs == 3, "the changed input is another call"


def test_as_many_results_as_units_are_kept() -> None:
    """Two units may share one control model with their own hints: both results stay until the next step."""
    control = Control()
    reused = ReusedCalls(control.forward, size=2)
    x, t = torch.randn(1, 3), torch.tensor([1.0])
    hints = torch.randn(1, 3), torch.randn(1, 3)
    for _ in range(3):  # three passes of one call, two units each
        for hint in hints:
            reused(x, hint, t)
    assert control.runs == 2


def test_equal_is_value_and_kind_equality() -> None:
    a = torch.ones(2)
    assert equal((a, {"k": [1, None]}), (a.clone(), {"k": [1, None]}))
    assert not equal(a, a.double()) and not equal(a, torch.ones(1, 2)) and not equal(a, 1.0)
    assert not equal([1], (1,)) and not equal({"k": 1}, {"k": 1, "j": 2}) and not equal(1, True)
