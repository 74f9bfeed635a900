"""LoRA Switch and LoRA Composite inside the real webui: the invariants of the paper's methods, and no trace left.

Images are 64x64, 8 Euler steps on the tiny random model; "same image" means max pixel difference <= 2/255
(hooked LoRA deltas vs merged weights differ in the last float bits), "different" a mean difference > 2/255. Where two
different computation paths are compared, the test first measures the noise floor (the reference computed two exact
ways) at that LoRA strength and requires it <= 1/255 (server.assert_noise_floor).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytest
from hosts.tier import assert_each_call_is_the_mean

from lib_multilora.schedule_picture import img2img_steps

from .helpers import PROMPT, STEPS, TITLE, gen, multilora, require_tier
from .server import assert_noise_floor, max_diff, mean_diff, trace

if TYPE_CHECKING:
    from .server import WebuiClient


require_tier()
np = pytest.importorskip("numpy")

pytestmark = pytest.mark.usefixtures("no_tracebacks")

AB = f"{PROMPT} <lora:mlA:1> <lora:mlB:1>"


@pytest.mark.parametrize("lora", ["mlA", "mlLocon", "mlLoha"])
def test_composite_over_one_lora_equals_plain_lora(webui: WebuiClient, lora: str) -> None:
    plain = gen(webui, f"{PROMPT} <lora:{lora}:0.8>")
    composite = gen(webui, f"{PROMPT} <lora:{lora}:0.8>", **multilora("Composite"))
    calls = trace(webui)
    assert len(calls) == STEPS and all(c["active"] == [0] for c in calls), "the engine ran every step"
    assert max_diff(plain.image, composite.image) <= 2
    assert f"Multi-LoRA LoRAs: {lora}" in composite.infotext
    assert "only one LoRA" in composite.infotext


def test_switch_with_tau_at_least_steps_equals_first_lora_in_unet(webui: WebuiClient) -> None:
    ab = f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5>"
    reference = gen(webui, f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5:0>")  # B only in the text encoder
    assert_noise_floor(reference.image, gen(webui, f"{PROMPT} <lora:mlB:0.5:0> <lora:mlA:0.5>").image)
    switch = gen(webui, ab, **multilora("Switch", tau=STEPS))
    merge = gen(webui, ab)
    assert [c["active"] for c in trace(webui)] == []  # trace belongs to the last (plain) generation
    assert max_diff(reference.image, switch.image) <= 2
    assert mean_diff(merge.image, switch.image) > 2


def test_switch_tau1_differs_from_each_lora_and_from_merge(webui: WebuiClient) -> None:
    switch = gen(webui, AB, **multilora("Switch", tau=1))
    assert [c["active"] for c in trace(webui)] == [[i % 2] for i in range(STEPS)]
    only_a = gen(webui, f"{PROMPT} <lora:mlA:1> <lora:mlB:1:0>")
    only_b = gen(webui, f"{PROMPT} <lora:mlA:1:0> <lora:mlB:1>")
    merge = gen(webui, AB)
    for other in (only_a, only_b, merge):
        assert mean_diff(switch.image, other.image) > 2


def test_switch_trace_follows_tau(webui: WebuiClient) -> None:
    result = gen(webui, f"{PROMPT} <lora:mlA:1> <lora:mlB:1> <lora:mlC:1>", **multilora("Switch", tau=2))
    assert [c["step"] for c in trace(webui)] == list(range(STEPS))
    assert [c["active"] for c in trace(webui)] == [[0], [0], [1], [1], [2], [2], [0], [0]]
    assert "Multi-LoRA method: Switch" in result.infotext
    assert "Multi-LoRA switch every: 2" in result.infotext
    assert "got no step" not in result.infotext
    assert "Multi-LoRA LoRAs: mlA, mlB, mlC" in result.infotext or '"mlA, mlB, mlC"' in result.infotext


def test_composite_output_is_mean_of_single_lora_outputs_each_step(webui: WebuiClient) -> None:
    result = gen(webui, AB, **multilora("Composite"))
    assert_each_call_is_the_mean(trace(webui), STEPS)
    assert mean_diff(result.image, gen(webui, AB).image) > 2, "Composite differs from Merge"


def test_composite_subset_keeps_other_loras_merged(webui: WebuiClient) -> None:
    # compose only mlA: with one composed LoRA the pass equals the plain prompt (mlB stays merged)
    plain = gen(webui, AB)
    subset = gen(webui, AB, **multilora("Composite", loras="mlA"))
    assert [c["active"] for c in trace(webui)] == [[0]] * STEPS
    assert max_diff(plain.image, subset.image) <= 2


# strengths where the noise floor stays within 1/255 (the LoHa's random delta is stronger)
@pytest.mark.parametrize(("second", "kept_merged", "w"), [("mlB", True, 0.5), ("mlLoha", False, 0.3)])
def test_plain_loras_stay_merged_other_types_are_taken_out_for_the_pass(
    webui: WebuiClient, second: str, kept_merged: bool, w: float
) -> None:
    """Plain LoRAs stay in the built-in's list (merged) and their hooks subtract the inactive ones; a LoHa among the
    composed takes them all out for the pass. mlC is not composed and stays merged either way. Both ways the
    result is the composed LoRA alone in the UNet."""
    prompt = f"{PROMPT} <lora:mlA:{w}> <lora:{second}:{w}> <lora:mlC:{w}>"
    switch = gen(webui, prompt, **multilora("Switch", tau=STEPS, loras=f"mlA,{second}"))
    calls = trace(webui)
    assert [c["active"] for c in calls] == [[0]] * STEPS
    expected = ["mlA", second, "mlC"] if kept_merged else ["mlC"]
    assert all(c["loaded"] == expected for c in calls), calls[0]["loaded"]
    assert [n["name"] for n in webui.loaded_networks()] == ["mlA", second, "mlC"], "restored after the pass"
    reference = gen(webui, f"{PROMPT} <lora:mlA:{w}> <lora:{second}:{w}:0> <lora:mlC:{w}>")  # second: TE only
    swapped = gen(webui, f"{PROMPT} <lora:mlC:{w}> <lora:{second}:{w}:0> <lora:mlA:{w}>")
    assert_noise_floor(reference.image, swapped.image)
    assert max_diff(reference.image, switch.image) <= 2


def test_prompt_tags_drive_the_method_without_the_panel(webui: WebuiClient) -> None:
    panel = gen(webui, AB, **multilora("Composite"))
    tagged = gen(webui, f"{AB} <multilora:composite>")
    assert max_diff(panel.image, tagged.image) == 0
    assert "Multi-LoRA method: Composite" in tagged.infotext
    switched = gen(webui, f"{AB} <multilora:switch:1>", **multilora("Composite"))  # tag wins over panel
    assert [c["active"] for c in trace(webui)] == [[i % 2] for i in range(STEPS)]
    assert "Multi-LoRA method: Switch" in switched.infotext
    off = gen(webui, f"{AB} <multilora:off>", **multilora("Composite"))
    assert max_diff(off.image, gen(webui, AB).image) == 0


@pytest.mark.parametrize(
    ("prompt", "extra", "fragment"),
    [
        (AB, multilora("Switch", tau=0), "positive whole number"),
        (AB, multilora("Switch", tau=-3), "positive whole number"),
        (AB, multilora("Blend"), "unknown method"),
        (AB, multilora("Composite", loras="mlA, doesNotExist"), "not loaded by the prompt: doesNotExist"),
        (PROMPT, multilora("Composite"), "no <lora"),
        (f"{AB} <multilora:switch:abc>", {}, "ignored <multilora:switch:abc>"),
        (f"{AB} <multilora:>", {}, "removed malformed tag"),
        (f"{AB} <multilora:switch", {}, "removed malformed tag"),
    ],
)
def test_bad_input_warns_and_falls_back_to_plain(
    webui: WebuiClient, prompt: str, extra: dict[str, Any], fragment: str | None
) -> None:
    plain = gen(webui, prompt.split(" <multilora")[0])
    result = gen(webui, prompt, **extra)
    assert max_diff(plain.image, result.image) == 0
    assert "Multi-LoRA method" not in result.infotext
    if fragment is not None:
        assert "Multi-LoRA warning" in result.infotext and fragment in result.infotext, result.infotext


def test_bad_api_args_are_reported_not_crashing(webui: WebuiClient) -> None:
    plain = gen(webui, AB)
    result = gen(webui, AB, alwayson_scripts={TITLE: {"args": [True, "Switch", "abc"]}})
    assert max_diff(plain.image, result.image) == 0
    assert "bad script args" in result.infotext


def test_img2img_switch_schedules_on_steps_actually_run(webui: WebuiClient) -> None:
    init = gen(webui, PROMPT).image
    result = webui.img2img(
        prompt=AB, init_images=[init], steps=STEPS, denoising_strength=0.5, **multilora("Switch", tau=1)
    )
    calls = trace(webui)
    # the steps after the denoising strength, as the panel's schedule picture counts them in img2img
    assert [c["step"] for c in calls] == list(range(img2img_steps(STEPS, 0.5, fix_steps=False)))
    assert [c["active"] for c in calls] == [[i % 2] for i in range(len(calls))]
    assert "Multi-LoRA method: Switch" in result.infotext


def test_disabled_is_bit_identical_to_webui_without_extension(
    webui: WebuiClient, webui_without_extension: WebuiClient
) -> None:
    for prompt in (PROMPT, AB):
        ours = gen(webui, prompt, **multilora("Composite", enabled=False))
        reference = webui_without_extension.txt2img(prompt=prompt, steps=STEPS)
        assert max_diff(ours.image, reference.image) == 0
        assert "Multi-LoRA" not in ours.infotext


def test_no_trace_after_switch_and_composite(webui: WebuiClient) -> None:
    before_image = gen(webui, AB).image
    before = webui.get("/multilora-probe/fingerprint")
    for extra in (multilora("Switch", tau=1), multilora("Composite")):
        gen(webui, AB, **extra)
        after = webui.get("/multilora-probe/fingerprint")
        assert after == before
    assert max_diff(gen(webui, AB).image, before_image) == 0
