"""How the methods fit the webui: API arg forms, X/Y/Z axes, text-encoder policy, hires-pass modes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from hosts.tier import axis_index, xyz_args

from .helpers import PROMPT, STEPS, TITLE, gen, ml, require_tier
from .server import assert_noise_floor, max_diff, trace

if TYPE_CHECKING:
    from .server import WebuiClient


require_tier()
np = pytest.importorskip("numpy")

pytestmark = pytest.mark.usefixtures("no_tracebacks")

AB = f"{PROMPT} <lora:mlA:1> <lora:mlB:1>"
ABC = f"{AB} <lora:mlC:1>"


def test_api_accepts_named_dict_and_positional_args_alike(webui: WebuiClient) -> None:
    named = gen(webui, AB, **ml(method="composite"))
    positional = gen(webui, AB, alwayson_scripts={TITLE: {"args": [True, "Composite", 5, ""]}})
    assert max_diff(named.image, positional.image) == 0
    assert "Multi-LoRA method: Composite" in named.infotext


def test_api_unknown_named_arg_is_reported(webui: WebuiClient) -> None:
    plain = gen(webui, AB)
    result = gen(webui, AB, **ml(method="Switch", bogus=1))
    assert max_diff(plain.image, result.image) == 0
    assert "bad script args" in result.infotext and "bogus" in result.infotext


def test_xyz_method_axis_puts_merge_switch_composite_side_by_side(webui: WebuiClient) -> None:
    x_type = axis_index(webui, "[Multi-LoRA] Method")
    script_args = xyz_args(x_type, "Merge, Switch, Composite")
    result = webui.txt2img(prompt=AB, steps=STEPS, script_name="x/y/z plot", script_args=script_args)
    assert len(result.images) == 4  # the grid, then each cell
    cells = result.info["infotexts"][1:]
    assert ["Multi-LoRA method: Merge" in cells[0], "Multi-LoRA method: Switch" in cells[1]] == [True, True]
    assert "Multi-LoRA method: Composite" in cells[2]
    merge, switch, composite = result.images[1:]
    assert max_diff(merge, gen(webui, AB).image) == 0
    assert max_diff(switch, gen(webui, AB, **ml(method="Switch")).image) <= 2
    assert max_diff(composite, gen(webui, AB, **ml(method="Composite")).image) <= 2


def test_xyz_tau_axis(webui: WebuiClient) -> None:
    x_type = axis_index(webui, "[Multi-LoRA] Switch τ")
    script_args = xyz_args(x_type, "1, 8")
    result = webui.txt2img(
        prompt=f"{AB} <multilora:switch>", steps=STEPS, script_name="x/y/z plot", script_args=script_args
    )
    cells = result.info["infotexts"][1:]
    assert "Multi-LoRA switch every: 1" in cells[0] and "Multi-LoRA switch every: 8" in cells[1]


def test_text_encoder_first_equals_first_lora_only(webui: WebuiClient) -> None:
    ab = f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5>"
    gen(webui, ab)  # fills the webui's cond cache with the all-LoRA text encoder
    first = gen(webui, ab, **ml(method="Switch", tau=STEPS, text_encoder="First"))
    reference = gen(webui, f"{PROMPT} <lora:mlA:0.5>")
    assert_noise_floor(gen(webui, ab).image, gen(webui, f"{PROMPT} <lora:mlB:0.5> <lora:mlA:0.5>").image)
    assert max_diff(first.image, reference.image) <= 2
    assert "Multi-LoRA text encoder: First" in first.infotext
    assert max_diff(gen(webui, ab).image, gen(webui, ab).image) == 0


def test_text_encoder_none_keeps_static_loras(webui: WebuiClient) -> None:
    none = gen(webui, AB, **ml(method="Composite", loras="mlA", text_encoder="None"))
    reference = gen(webui, f"{PROMPT} <lora:mlA:0:1> <lora:mlB:1>")
    assert max_diff(none.image, reference.image) <= 2


def test_plain_generation_after_text_encoder_policy_is_unchanged(webui: WebuiClient) -> None:
    before = gen(webui, AB)
    fingerprint = webui.get("/multilora-probe/fingerprint")
    gen(webui, AB, **ml(method="Composite", text_encoder="None"))
    assert max_diff(gen(webui, AB).image, before.image) == 0
    assert webui.get("/multilora-probe/fingerprint") == fingerprint


HIRES = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 4}
HIRES["denoising_strength"] = 0.5


@pytest.mark.parametrize(
    ("mode", "hires_active"),
    [("Restart", [[0], [1], [2], [0]]), ("Continue", [[2], [0], [1], [2]]), ("Off", [])],
)
def test_hires_pass_modes(webui: WebuiClient, mode: str, hires_active: list[list[int]]) -> None:
    # hires: 4 steps at denoising 0.5 run 3 sampler steps, 4 denoiser calls with Euler's final one
    result = gen(webui, ABC, **HIRES, **ml(method="Switch", tau=1, hires=mode))
    calls = trace(webui)
    assert [c["active"] for c in calls[:STEPS]] == [[i % 3] for i in range(STEPS)]
    assert [c["active"] for c in calls[STEPS:]] == hires_active
    assert result.image.shape[:2] == (128, 128)


def test_foreign_linear_patch_is_detected_and_refused(webui: WebuiClient) -> None:
    plain = gen(webui, AB)
    assert webui.post("/multilora-probe/foreign-linear-patch", {"on": True})["patched"]
    try:
        result = gen(webui, AB, **ml(method="Composite"))
    finally:
        assert not webui.post("/multilora-probe/foreign-linear-patch", {"on": False})["patched"]
    assert max_diff(plain.image, result.image) == 0
    assert "replaced torch.nn.Linear.forward" in result.infotext and "Multi-LoRA method" not in result.infotext
    assert "Multi-LoRA method: Composite" in gen(webui, AB, **ml(method="Composite")).infotext
