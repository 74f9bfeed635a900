from __future__ import annotations

import pytest

from lib_multilora.schedule import describe_schedule, sampling_step, switch_index, switch_schedule


def test_switch_cycles_every_tau_steps_in_prompt_order() -> None:
    assert switch_schedule(12, 3, 2) == [0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1]
    assert switch_schedule(7, 1, 3) == [0, 1, 2, 0, 1, 2, 0]


def test_tau_at_least_steps_keeps_first_lora() -> None:
    assert switch_schedule(8, 8, 3) == [0] * 8
    assert switch_schedule(8, 50, 2) == [0] * 8


@pytest.mark.parametrize("tau", [0, -1])
def test_switch_rejects_non_positive_tau(tau: int) -> None:
    with pytest.raises(ValueError):
        switch_index(0, tau, 2)


def test_sampling_step_folds_second_order_calls() -> None:
    # Heun: 2 denoiser calls per step
    assert [sampling_step(c, 20, 10) for c in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [sampling_step(c, 8, 8) for c in range(3)] == [0, 1, 2]
    assert sampling_step(5, None, None) == 5


def test_describe_schedule() -> None:
    assert describe_schedule(12, 5, ["A", "B"]) == "A: 0-4 | B: 5-9 | A: 10-11"
    assert describe_schedule(3, 1, ["A", "B", "C"]) == "A: 0 | B: 1 | C: 2"
    assert describe_schedule(3, 0, ["A"]) == ""
