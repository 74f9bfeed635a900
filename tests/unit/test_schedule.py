from __future__ import annotations

import pytest

from lib_multilora.schedule import (
    active_loras,
    describe_schedule,
    hires_offset,
    sampling_step,
    switch_index,
    switch_schedule,
    window_steps,
)


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


def test_window_bounds_read_like_prompt_editing_steps() -> None:
    assert list(window_steps(0.0, 1.0, 10)) == list(range(10)), "the whole pass"
    assert list(window_steps(0.2, 0.8, 10)) == [2, 3, 4, 5, 6, 7]
    assert list(window_steps(0.0, 0.4, 10)) == [0, 1, 2, 3]
    assert list(window_steps(3, 6, 10)) == [3, 4, 5], "above 1: step numbers"
    assert list(window_steps(0.5, 0.5, 10)) == [], "an empty window"
    assert list(window_steps(4, 50, 10)) == [4, 5, 6, 7, 8, 9], "clipped to the pass"


def test_active_loras_per_method_and_window() -> None:
    assert [active_loras(i, 6, "Switch", 2, 2) for i in range(6)] == [[0], [0], [1], [1], [0], [0]]
    window = (0.5, 1.0)  # steps 3-5 of 6; the schedule starts at step 3
    assert [active_loras(i, 6, "Switch", 2, 1, window=window) for i in range(6)] == [[], [], [], [0], [1], [0]]
    assert active_loras(0, 6, "Composite", 3, 5, weights=[0.5, 0.0, 0.5]) == [0, 2]
    assert active_loras(0, 6, "Spatial", 2, 5) == [0, 1]


def test_the_hires_pass_restarts_continues_or_runs_merged() -> None:
    assert (hires_offset("Restart", 20), hires_offset("Continue", 20), hires_offset("Off", 20)) == (0, 20, None)
