"""Composite weights, the step window and Spatial Composite in a real Forge (the A1111 tier has the full set; these
are the invariants that show each runs through Forge's model function wrapper)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from webui.server import SAME, max_diff, trace

from .helpers import AB, PROMPT, STEPS, gen, ml, reference_within_floor
from .server import SKIP_REASON, forge_dir_from_env

if TYPE_CHECKING:
    from webui.server import WebuiClient

if forge_dir_from_env() is None:
    pytest.skip(SKIP_REASON, allow_module_level=True)

pytest.importorskip("numpy")

pytestmark = pytest.mark.usefixtures("no_tracebacks")


def test_weight_one_and_zero_is_switch_on_the_first_lora(forge: WebuiClient) -> None:
    weighted = gen(forge, AB, **ml(method="Composite", weights="1,0"))
    assert [c["active"] for c in trace(forge)] == [[0]] * STEPS
    assert max_diff(weighted.image, gen(forge, AB, **ml(method="Switch", tau=STEPS)).image) == 0


def test_the_window_runs_merged_outside_and_an_empty_one_is_merge(forge: WebuiClient) -> None:
    gen(forge, AB, **ml(method="Composite", end=0.5))
    assert [c["active"] for c in trace(forge)] == [[0, 1]] * (STEPS // 2) + [[]] * (STEPS // 2)
    empty = gen(forge, AB, **ml(method="Composite", start=0.5, end=0.5))
    assert "is empty" in empty.infotext and max_diff(empty.image, gen(forge, AB).image) == 0


def test_spatial_is_the_formula_each_step_with_forges_row_kinds(forge: WebuiClient) -> None:
    result = gen(forge, AB, **ml(method="Spatial"))
    calls = trace(forge)
    assert len(calls) == STEPS and "Multi-LoRA method: Spatial" in result.infotext
    for c in calls:
        assert c["cond_rows"] == [False, True], "Forge batches the uncond row first"
        assert c["diff_vs_spatial"] <= 1e-5, c


def test_spatial_at_a_huge_temperature_is_composite(forge: WebuiClient) -> None:
    composite = reference_within_floor(forge, AB, f"{PROMPT} <lora:mlB:0.5> <lora:mlA:0.5>", **ml(method="Composite"))
    spatial = gen(forge, AB, **ml(method="Spatial", temperature=1e9))
    assert max_diff(spatial.image, composite) <= SAME
