"""Composite weights (issue 13, item 1): ``eps = sum w_i u_i + s (sum w_i c_i - sum w_i u_i)``, the weights given in
composed order and normalised to sum 1, from the panel, the tag, the API, infotext and X/Y/Z."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from hosts.tier import axis_index, xyz_args

from .helpers import PROMPT, STEPS, TITLE, gen, require_tier
from .server import max_diff, mean_diff, trace

if TYPE_CHECKING:
    from .server import WebuiClient


require_tier()

pytestmark = pytest.mark.usefixtures("no_tracebacks")

AB = f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5>"


def composite(**named: Any) -> dict[str, Any]:
    return {"alwayson_scripts": {TITLE: {"args": [{"enabled": True, "method": "Composite", **named}]}}}


def test_weight_one_and_zero_is_the_first_lora_alone_as_switch_runs_it(webui: WebuiClient) -> None:
    weighted = gen(webui, AB, **composite(weights="1,0"))
    assert [c["active"] for c in trace(webui)] == [[0]] * STEPS, "the weight-0 LoRA is not run"
    switch = gen(webui, AB, alwayson_scripts={TITLE: {"args": [{"enabled": True, "method": "Switch", "tau": STEPS}]}})
    assert max_diff(weighted.image, switch.image) == 0
    assert 'Multi-LoRA composite weights: "1,0"' in weighted.infotext and "got no step" not in weighted.infotext


def test_equal_weights_are_todays_composite_bitwise(webui: WebuiClient) -> None:
    plain_composite = gen(webui, AB, **composite())
    assert max_diff(gen(webui, AB, **composite(weights="3, 3")).image, plain_composite.image) == 0


def test_the_per_step_output_is_the_weighted_mean(webui: WebuiClient) -> None:
    weighted = gen(webui, AB, **composite(weights="3,1"))
    calls = trace(webui)
    assert len(calls) == STEPS
    for c in calls:
        assert c["active"] == [0, 1]
        assert c["diff_vs_mean"] <= 1e-5, c  # the probe recomputes 0.75 * A + 0.25 * B
    assert mean_diff(weighted.image, gen(webui, AB, **composite()).image) > 2, "and it is not the plain mean"


@pytest.mark.parametrize(
    ("weights", "problem"),
    [("1,2,3", "3 weight(s) for 2 composed LoRA(s)"), ("1,-1", ">= 0"), ("0,0", "all zero"), ("a,b", "numbers")],
)
def test_bad_weights_are_named_and_run_with_equal_weights(webui: WebuiClient, weights: str, problem: str) -> None:
    result = gen(webui, AB, **composite(weights=weights))
    assert problem in result.infotext and "using equal weights" in result.infotext
    assert max_diff(result.image, gen(webui, AB, **composite()).image) == 0


def test_tag_and_positional_api_args_carry_the_weights(webui: WebuiClient) -> None:
    panel = gen(webui, AB, **composite(weights="3,1"))
    tagged = gen(webui, f"{AB} <multilora:composite:weights=3,1>")
    positional = gen(
        webui, AB, alwayson_scripts={TITLE: {"args": [True, "Composite", 5, "", "Sequential", "All", "Restart", "3,1"]}}
    )
    assert max_diff(tagged.image, panel.image) == 0 and max_diff(positional.image, panel.image) == 0


def test_xyz_composite_weights_axis(webui: WebuiClient) -> None:
    x_type = axis_index(webui, "[Multi-LoRA] Composite weights")
    result = webui.txt2img(
        prompt=f"{AB} <multilora:composite>",
        steps=STEPS,
        script_name="x/y/z plot",
        script_args=xyz_args(x_type, '"1,0", "3,1"'),
    )
    first, second = result.info["infotexts"][1:]
    assert 'Multi-LoRA composite weights: "1,0"' in first and 'Multi-LoRA composite weights: "3,1"' in second
    assert max_diff(result.images[2], gen(webui, AB, **composite(weights="3,1")).image) == 0
