"""The step window (issue 13, item 2): the method runs between ``start`` and ``end`` (prompt editing's convention: up
to 1 a fraction of the steps, above 1 a step number); outside it every LoRA acts merged, at no extra cost."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from hosts.tier import axis_index, xyz_args

from .helpers import PROMPT, STEPS, gen, ml, require_tier
from .server import assert_noise_floor, max_diff, mean_diff, trace

if TYPE_CHECKING:
    from .server import WebuiClient


require_tier()

pytestmark = pytest.mark.usefixtures("no_tracebacks")

AB = f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5>"


@pytest.mark.parametrize("method", ["Switch", "Composite"])
def test_an_empty_window_is_merge_bitwise(webui: WebuiClient, method: str) -> None:
    result = gen(webui, AB, **ml(method=method, start=0.5, end=0.5))
    assert trace(webui) == [] and "the step window 0.5-0.5 is empty" in result.infotext
    assert max_diff(result.image, gen(webui, AB).image) == 0


def test_the_whole_pass_as_a_window_is_no_window_bitwise(webui: WebuiClient) -> None:
    windowed = gen(webui, AB, **ml(method="Composite", start=0, end=1))
    assert "Multi-LoRA start" not in windowed.infotext
    assert max_diff(windowed.image, gen(webui, AB, **ml(method="Composite")).image) == 0


def test_composite_until_half_way_then_merged(webui: WebuiClient) -> None:
    result = gen(webui, f"{AB} <multilora:composite:end=0.5>")
    calls = trace(webui)
    assert [c["active"] for c in calls] == [[0, 1]] * (STEPS // 2) + [[]] * (STEPS // 2), "merged steps: no LoRA run"
    assert "Multi-LoRA end: 0.5" in result.infotext
    # the late steps refine details: the image is near full Composite's (the layout is set early), far from Merge's
    composite, merge = gen(webui, AB, **ml(method="Composite")), gen(webui, AB)
    assert max_diff(result.image, composite.image) > 0 and mean_diff(result.image, merge.image) > 2


def test_switch_schedule_starts_at_the_window(webui: WebuiClient) -> None:
    gen(webui, f"{AB} <multilora:switch:1:start=0.25:end=0.75>")
    assert [c["active"] for c in trace(webui)] == [[], [], [0], [1], [0], [1], [], []]
    gen(webui, AB, **ml(method="Switch", tau=1, start=2, end=4))  # above 1: step numbers
    assert [c["active"] for c in trace(webui)] == [[], [], [0], [1], [], [], [], []]


@pytest.mark.parametrize(("second", "w"), [("mlB", 0.5), ("mlLoha", 0.3)])  # kept merged; taken out of the weights
def test_outside_the_window_every_lora_acts_as_merged(webui: WebuiClient, second: str, w: float) -> None:
    """A window past the last step: every call runs merged; with a LoHa among the composed the pass took them out of
    the weights, and outside the window the hooks put each one back."""
    prompt = f"{PROMPT} <lora:mlA:{w}> <lora:{second}:{w}>"
    merge = gen(webui, prompt)
    assert_noise_floor(merge.image, gen(webui, f"{PROMPT} <lora:{second}:{w}> <lora:mlA:{w}>").image)
    result = gen(webui, prompt, **ml(method="Composite", start=20, end=30))
    assert [c["active"] for c in trace(webui)] == [[]] * STEPS
    assert max_diff(result.image, merge.image) <= 2


def test_xyz_window_end_axis(webui: WebuiClient) -> None:
    x_type = axis_index(webui, "[Multi-LoRA] Window end")
    result = webui.txt2img(
        prompt=f"{AB} <multilora:composite>",
        steps=STEPS,
        script_name="x/y/z plot",
        script_args=xyz_args(x_type, "0.5, 1"),
    )
    half, whole = result.info["infotexts"][1:]
    assert "Multi-LoRA end: 0.5" in half and "Multi-LoRA end" not in whole
    assert max_diff(result.images[2], gen(webui, AB, **ml(method="Composite")).image) == 0
