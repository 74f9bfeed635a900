"""How the methods fit Forge: disabled vs absent, API arg forms and infotext, prompt tags, X/Y/Z axes, the
text-encoder policy, hires fix, img2img, and the cases Multi-LoRA refuses (said in the infotext, image as Merge)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from hosts.tier import assert_no_trace, axis_index, snapshot, xyz_args
from webui.server import SAME, max_diff, mean_diff, trace

from .helpers import (
    A_UNET,
    AB,
    ABC,
    DIFFERENT,
    PROMPT,
    STEPS,
    TITLE,
    gen,
    ml,
    multidiffusion,
    multilora,
    reference_within_floor,
    unet_storage,
)
from .server import REFORGE, SKIP_REASON, forge_dir_from_env

if TYPE_CHECKING:
    from webui.server import WebuiClient

if forge_dir_from_env() is None:
    pytest.skip(SKIP_REASON, allow_module_level=True)

pytest.importorskip("numpy")


pytestmark = pytest.mark.usefixtures("no_tracebacks")

HIRES: dict[str, Any] = {
    "enable_hr": True,
    "hr_scale": 2,
    "hr_upscaler": "Latent",
    "hr_second_pass_steps": 4,
    "denoising_strength": 0.5,
    # Forge's API leaves it None, which its hires pass cannot read ("'Use same choices' not in None")
    "hr_additional_modules": ["Use same choices"],
}


def test_disabled_is_bit_identical_to_forge_without_extension(
    forge: WebuiClient, forge_without_extension: WebuiClient
) -> None:
    for prompt in (PROMPT, AB):
        reference = forge_without_extension.txt2img(prompt=prompt, steps=STEPS)
        for extra in ({}, multilora("Composite", enabled=False)):
            ours = gen(forge, prompt, **extra)
            assert max_diff(ours.image, reference.image) == 0
            assert "Multi-LoRA" not in ours.infotext


def test_api_accepts_named_dict_and_positional_args_alike(forge: WebuiClient) -> None:
    named = gen(forge, AB, **ml(method="switch", tau=2))
    assert [c["active"] for c in trace(forge)] == [[(i // 2) % 2] for i in range(STEPS)]
    positional = gen(forge, AB, alwayson_scripts={TITLE: {"args": [True, "Switch", 2, ""]}})
    assert max_diff(named.image, positional.image) == 0
    assert "Multi-LoRA method: Switch" in named.infotext and "Multi-LoRA switch every: 2" in named.infotext
    assert "Multi-LoRA LoRAs: mlA, mlB" in named.infotext or '"mlA, mlB"' in named.infotext
    tagged = gen(forge, f"{AB} <multilora:switch:2>")
    assert max_diff(named.image, tagged.image) == 0, "a prompt tag drives the method without the panel"


def test_bad_api_args_are_reported_and_the_image_is_plain(forge: WebuiClient) -> None:
    plain = gen(forge, AB)
    for args in ([True, "Switch", "abc"], [{"enabled": True, "method": "Switch", "bogus": 1}]):
        result = gen(forge, AB, alwayson_scripts={TITLE: {"args": args}})
        assert max_diff(plain.image, result.image) == 0
        assert "bad script args" in result.infotext and "Multi-LoRA method" not in result.infotext


def test_xyz_method_axis_puts_merge_switch_composite_side_by_side(forge: WebuiClient) -> None:
    script_args = xyz_args(axis_index(forge, "[Multi-LoRA] Method"), "Merge, Switch, Composite", REFORGE)
    result = forge.txt2img(prompt=AB, steps=STEPS, script_name="x/y/z plot", script_args=script_args)
    assert len(result.images) == 4  # the grid, then each cell
    cells = result.info["infotexts"][1:]
    assert "Multi-LoRA method: Merge" in cells[0]
    assert "Multi-LoRA method: Switch" in cells[1] and "Multi-LoRA method: Composite" in cells[2]
    assert [c["active"] for c in trace(forge)] == [[0, 1]] * STEPS, "the last cell ran Composite"
    merge, switch, composite = result.images[1:]
    assert max_diff(merge, gen(forge, AB).image) == 0
    assert max_diff(switch, gen(forge, AB, **ml(method="Switch")).image) == 0
    assert mean_diff(composite, merge) > DIFFERENT and mean_diff(composite, switch) > DIFFERENT


def test_xyz_tau_axis(forge: WebuiClient) -> None:
    script_args = xyz_args(axis_index(forge, "[Multi-LoRA] Switch τ"), f"1, {STEPS}", REFORGE)
    result = forge.txt2img(
        prompt=f"{AB} <multilora:switch>", steps=STEPS, script_name="x/y/z plot", script_args=script_args
    )
    cells = result.info["infotexts"][1:]
    assert "Multi-LoRA switch every: 1" in cells[0] and f"Multi-LoRA switch every: {STEPS}" in cells[1]
    assert [c["active"] for c in trace(forge)] == [[0]] * STEPS, "the last cell ran tau = steps"


def test_text_encoder_first_equals_first_lora_only_and_leaves_no_trace(forge: WebuiClient) -> None:
    reference = reference_within_floor(forge, f"{PROMPT} <lora:mlA:0.5>", f"{PROMPT} <lora:mlA:0.3> <lora:mlA:0.2>")
    before = snapshot(forge, lambda: gen(forge, AB))  # also fills Forge's cond cache with the all-LoRA conds
    first = gen(forge, AB, **ml(method="Switch", tau=STEPS, text_encoder="First"))
    assert max_diff(first.image, reference) <= SAME
    assert "Multi-LoRA text encoder: First" in first.infotext
    assert_no_trace(forge, lambda: gen(forge, AB), before)


def test_text_encoder_none_keeps_the_static_loras(forge: WebuiClient) -> None:
    reference = reference_within_floor(
        forge, f"{PROMPT} <lora:mlA:0:0.5> <lora:mlB:0.5>", f"{PROMPT} <lora:mlB:0.5> <lora:mlA:0:0.5>"
    )
    none = gen(forge, AB, **ml(method="Composite", loras="mlA", text_encoder="None"))
    assert max_diff(none.image, reference) <= SAME


@pytest.mark.parametrize(
    ("mode", "first_hires_step"),
    [("Restart", 0), ("Continue", STEPS), ("Off", None)],
    ids=["Restart", "Continue", "Off"],
)
def test_hires_fix_runs_the_method_in_both_passes(forge: WebuiClient, mode: str, first_hires_step: int | None) -> None:
    """Forge runs process_before_every_sampling twice for the hires pass, resetting its objects in between: the
    method runs in each pass as the mode says, and (Restart) nothing of either pass is left."""
    before = snapshot(forge, lambda: gen(forge, ABC, **HIRES)) if mode == "Restart" else None
    result = gen(forge, ABC, **HIRES, **ml(method="Switch", tau=1, hires=mode))
    calls = trace(forge)
    assert [c["step"] for c in calls[:STEPS]] == list(range(STEPS))
    assert [c["active"] for c in calls[:STEPS]] == [[i % 3] for i in range(STEPS)]
    hires = calls[STEPS:]
    if first_hires_step is None:
        assert hires == []
    else:
        steps = [c["step"] for c in hires]
        assert len(hires) >= 2 and steps == list(range(first_hires_step, first_hires_step + len(hires)))
        assert [c["active"] for c in hires] == [[s % 3] for s in steps]
    assert result.image.shape == (128, 128, 3)
    assert f"Multi-LoRA hires: {mode}" in result.infotext or mode == "Restart"
    if before is not None:
        assert mean_diff(result.image, before.images[0]) > DIFFERENT, "differs from Merge"
        assert_no_trace(forge, lambda: gen(forge, ABC, **HIRES), before)


def test_multidiffusion_wraps_the_method(forge: WebuiClient) -> None:
    """Forge's built-in MultiDiffusion sets its own model function wrapper before ours: ours runs inside it, on the
    tiles it batches, and the invariant holds with it on; nothing of the pass is left."""
    tiled = multidiffusion(4)
    a_unet = f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5:0>"
    swapped = f"{PROMPT} <lora:mlB:0.5:0> <lora:mlA:0.5>"
    reference = reference_within_floor(forge, a_unet, swapped, alwayson_scripts=tiled)
    before = snapshot(forge, lambda: gen(forge, AB, alwayson_scripts=tiled))
    switch = gen(forge, AB, alwayson_scripts={**tiled, **ml(method="Switch", tau=STEPS)["alwayson_scripts"]})
    assert [c["active"] for c in trace(forge)] == [[0]] * STEPS
    assert "multidiffusion_enabled: True" in switch.infotext and "Multi-LoRA method: Switch" in switch.infotext
    assert max_diff(reference, switch.image) <= SAME
    assert mean_diff(before.images[0], switch.image) > DIFFERENT, "differs from Merge"
    assert_no_trace(forge, lambda: gen(forge, AB, alwayson_scripts=tiled), before)


def test_img2img_schedules_on_the_steps_actually_run_and_leaves_no_trace(forge: WebuiClient) -> None:
    init = gen(forge, PROMPT).image

    def img2img(**extra: Any) -> Any:
        return forge.img2img(prompt=AB, init_images=[init], steps=STEPS, denoising_strength=0.5, **extra)

    before = snapshot(forge, img2img)
    switch = img2img(**ml(method="Switch", tau=1))
    calls = trace(forge)
    assert 2 <= len(calls) < STEPS and [c["step"] for c in calls] == list(range(len(calls)))
    assert [c["active"] for c in calls] == [[i % 2] for i in range(len(calls))]
    assert "Multi-LoRA method: Switch" in switch.infotext
    composite = img2img(**ml(method="Composite"))
    assert all(c["active"] == [0, 1] and c["diff_vs_mean"] <= 1e-5 for c in trace(forge))
    assert mean_diff(composite.image, before.images[0]) > DIFFERENT, "differs from Merge"
    assert_no_trace(forge, img2img, before)


@pytest.fixture
def unsupported_model(forge: WebuiClient) -> Iterator[None]:
    """The host's model presented as one Multi-LoRA does not cover there (the probe flips its flags), put back
    afterwards: on reForge SD3; on Forge, which covers each of its engines (its SD3 by class: test_flux.test_sd35),
    a model of Forge's SD1 class without the SD1 flag, as a new engine type would come."""
    flags = {"is_sd1": False, "is_sd3": True} if REFORGE else {"is_sd1": False}
    previous = forge.post("/multilora-probe/model-flags", flags)
    try:
        yield
    finally:
        forge.post("/multilora-probe/model-flags", previous)


@pytest.mark.parametrize(
    ("prompt", "extra", "fragment"),
    [
        (AB, multilora("Composite", loras="mlA, mlZ"), "LoRA(s) to compose not loaded by the prompt: mlZ"),
        (AB, multilora("Switch", tau=0), "positive whole number"),
        (PROMPT, multilora("Composite"), "no <lora:...> tags in the prompt"),
    ],
    ids=["unknown-lora", "bad-tau", "no-lora"],
)
def test_refused_input_says_why_and_the_image_is_plain(
    forge: WebuiClient, prompt: str, extra: dict[str, Any], fragment: str
) -> None:
    plain = gen(forge, prompt)
    result = gen(forge, prompt, **extra)
    assert max_diff(plain.image, result.image) == 0
    assert "Multi-LoRA warning" in result.infotext and fragment in result.infotext, result.infotext
    assert "Multi-LoRA method" not in result.infotext


@pytest.mark.usefixtures("unsupported_model")
def test_unsupported_model_type_is_refused(forge: WebuiClient) -> None:
    plain = gen(forge, AB)
    result = gen(forge, AB, **ml(method="Composite", text_encoder="None"))
    assert max_diff(plain.image, result.image) == 0
    said = (
        "SD3 models are not supported (SD1, SD2 and SDXL are)"
        if REFORGE
        else "StableDiffusion models are not supported (SD1, SD2, SDXL, Flux, Chroma and SD3 are)"
    )
    assert said in result.infotext, result.infotext
    assert "Multi-LoRA method" not in result.infotext and trace(forge) == []


@pytest.mark.forge2_only("Diffusion in Low Bits (fp8 weights, online fp16 LoRAs) is Forge's; reForge has none")
def test_low_bit_unet_weights(forge: WebuiClient) -> None:
    """fp8 weights with Forge's "fp16 LoRA" option apply LoRAs online, in every forward: the composed ones are taken
    out of the pass's patcher and added by the hooks, so Switch with tau >= steps is Forge's own online generation of
    the first LoRA in the UNet; a LoHa among them is refused by name (its delta is computed from the weights, which do
    not hold the online LoRAs), the image plain. fp8 weights without it get every LoRA merged, rounded, into them: the
    composed LoRAs are taken out for the pass and their hooks run at compute precision, as on A1111 (the image is
    therefore not fp8 Merge's Switch to the pixel: the LoRAs skip fp8's rounding), and nothing of the pass is left."""
    with unet_storage(forge, "float8-e4m3fn (fp16 LoRA)"):
        reference = reference_within_floor(forge, A_UNET, f"{PROMPT} <lora:mlB:0.5:0> <lora:mlA:0.5>")
        switch = gen(forge, AB, **multilora("Switch", tau=STEPS))
        assert "Diffusion in Low Bits: float8-e4m3fn (fp16 LoRA)" in switch.infotext
        assert "Multi-LoRA method: Switch" in switch.infotext
        assert all(c["patched"] == [] for c in trace(forge)), "taken out of the online LoRAs for the pass"
        assert max_diff(reference, switch.image) <= SAME
        loha = f"{PROMPT} <lora:mlA:0.5> <lora:mlLoha:0.5>"
        plain = gen(forge, loha)
        # with the text-encoder policy on: a refused pass leaves the text encoder whole too, the image is plain
        refused = gen(forge, loha, **ml(method="Switch", tau=1, text_encoder="None"))
        assert max_diff(plain.image, refused.image) == 0
        assert "mlLoha: only plain LoRAs can be composed on UNet weights with LoRAs applied online" in refused.infotext
        assert "Multi-LoRA method" not in refused.infotext
    with unet_storage(forge, "float8-e4m3fn"):
        before = snapshot(forge, lambda: gen(forge, AB))
        switch = gen(forge, AB, **multilora("Switch", tau=1))
        assert "Diffusion in Low Bits: float8-e4m3fn" in switch.infotext and "fp16 LoRA" not in switch.infotext
        assert "Multi-LoRA method: Switch" in switch.infotext
        calls = trace(forge)
        assert [c["active"] for c in calls] == [[i % 2] for i in range(STEPS)]
        assert all(c["patched"] == [] for c in calls), "taken out of the fp8 weights for the pass"
        assert mean_diff(switch.image, before.images[0]) > DIFFERENT, "differs from Merge"
        assert_no_trace(forge, lambda: gen(forge, AB), before)
