"""LoRA Switch and LoRA Composite on Flux inside a real Forge: FLUX.1-dev's layout (distilled guidance) and
FLUX.1-schnell's, with LoRAs in kohya's layout (1:1 patches) and in diffusers'/ai-toolkit's (q, k and v as slices of
the fused projections: Forge's offset patches); on Chroma, Flux's derivative; and on SD3.5 (``test_sd35``).

The session's Forge is switched to the tiny Flux checkpoints (``tiny_dit.py``) for this module and back to the SD1
one after it, even on failure. Forge's own detection would take them for FLUX.1 at full size: the tier's probe
carries the one test-only patch of the host, which reads Flux's dimensions from the file
(``multilora_forge_probe.py``, "the tier's one test-only patch"); all the rest is Forge's own loader and sampling.
SD3.5's dimensions Forge reads from the file itself.

64x64, STEPS Euler steps on Forge's "Simple" schedule (the one its UI sets for Flux: the API's "Automatic" gives
Flux a discrete model's sigmas, up to 9999, and a black image), LoRAs at 0.5; "same image" and the noise floor as in
helpers.py, the floor measured in each test that compares two computation paths. CFG 1 with distilled guidance 3.5,
as Flux-dev runs (Forge then computes no uncond: every model call is cond rows only, each with the guidance in its
conds), and CFG 3 where the uncond rows matter (Batched, Spatial's row kinds).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from hosts.tier import assert_no_trace, axis_index, snapshot, xyz_args
from webui.server import SAME, max_diff, mean_diff, trace

from .flux_helpers import CFG3, CHROMA, FLUX, KOHYA, LAYOUT_IDS, LAYOUTS, SD35, STEPS, gen, within_floor
from .helpers import (
    DIFFERENT,
    PROMPT,
    assert_loaded,
    checkpoint,
    linked,
    ml,
    model_links,
    multilora,
)
from .server import REFORGE, SKIP_REASON, forge_dir_from_env, tracebacks
from .tiny_dit import CHROMA_NAME, FLUX_NAME, SCHNELL_NAME, SD35_NAME

if TYPE_CHECKING:
    from webui.server import Result, WebuiClient

    from .conftest import ForgeAssets

if forge_dir_from_env() is None:
    pytest.skip(SKIP_REASON, allow_module_level=True)

np = pytest.importorskip("numpy")

pytestmark = [
    pytest.mark.usefixtures("flux", "no_tracebacks"),
    pytest.mark.forge2_only(
        "reForge's webui layer builds every checkpoint but SD3 as an A1111 SD1/SD2/SDXL model "
        "(modules_forge/forge_loader.py): it has no Flux text path (T5, pooled CLIP-L, guidance), no Flux or Chroma"
    ),
]


@dataclass(frozen=True)
class FluxModel:
    """The Flux checkpoints the session's Forge runs for this module: its LoRAs' manifest entries, the first image the
    dev model made and Forge's log from the checkpoint switch to that image (the model load)."""

    loras: dict[str, dict[str, Any]]
    first: Result
    load_log: str


@pytest.fixture(scope="module")
def flux(forge: WebuiClient, forge_assets: ForgeAssets, flux_assets: dict[str, Any]) -> Iterator[FluxModel]:
    """Link the Flux checkpoints and LoRAs into the session server's checkpoint and LoRA dirs and make the dev one
    the current model; afterwards the session's checkpoint again (loaded) and the files unlinked."""
    links = model_links(flux_assets, forge_assets.ckpt.parent, forge_assets.lora_dir)
    with linked(forge, links), checkpoint(forge, FLUX_NAME, warm_up={}):
        mark = forge.log_mark()
        first = gen(forge, PROMPT)  # Forge loads the selected checkpoint at the next generation
        yield FluxModel(flux_assets["loras"], first, forge.log_text(mark))


def parts(load_log: str) -> str:
    """The state dict parts Forge's loader split the checkpoint into (its ``StateDict Keys`` line)."""
    found = re.search(r"StateDict Keys: (\{.*?\})", load_log)
    assert found is not None, load_log
    return found[1]


def test_forge_loads_it_as_flux_dev_and_it_renders(forge: WebuiClient, flux: FluxModel) -> None:
    status = forge.get("/multilora-probe/status")
    assert status["checkpoint"].startswith(FLUX_NAME) and status["model_type"] == "Flux", status
    # Flux's four parts, every key in its place; the transformer in fp32 (Forge's choice on a CPU)
    assert re.findall(r"'(\w+)': \d+", parts(flux.load_log)) == [
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "ignore",
    ]
    assert parts(flux.load_log).endswith("'ignore': 0}")
    assert "Missing:" not in flux.load_log and "Unexpected:" not in flux.load_log, flux.load_log
    assert "'storage_dtype': torch.float32" in flux.load_log
    assert not tracebacks(flux.load_log)
    assert "Distilled CFG Scale: 3.5" in flux.first.infotext
    assert flux.first.image.astype(np.float32).std() > 5, "a picture, not a flat one"


def test_both_layouts_patch_every_key(forge: WebuiClient, flux: FluxModel) -> None:
    """Forge matched every module of the kohya, diffusers and LoHa files, in the transformer and both text encoders
    (its own count of the entries it made, none skipped: q, k and v as three slices of one fused weight)."""
    names = ("mfA", "mfB", "mfB_te1", "mfB_te2", "mfdA", "mfdB", "mfLoha")
    mark = forge.log_mark()
    gen(forge, PROMPT + "".join(f" <lora:{name}:0.5>" for name in names), steps=1)
    log = forge.log_text(mark)
    assert "unmatched keys" not in log and "Mismatch" not in log, log
    for name in names:
        assert_loaded(log, name, flux.loras[name]["n_unet"], flux.loras[name]["n_te"])


@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_composite_over_one_lora_equals_plain_lora(forge: WebuiClient, flux: FluxModel, layout: str) -> None:
    prompts = LAYOUTS[layout]
    reference = within_floor(forge, prompts["A"], prompts["A twice"])
    assert mean_diff(reference, flux.first.image) > DIFFERENT, "the LoRA changes the image"
    composite = gen(forge, prompts["A"], **multilora("Composite"))
    assert [c["active"] for c in trace(forge)] == [[0]] * STEPS, "the method ran every step"
    assert max_diff(reference, composite.image) <= SAME
    assert "only one LoRA" in composite.infotext


def test_composite_over_a_lora_and_its_copy_equals_it(forge: WebuiClient) -> None:
    """Composite over mfA and mfA2 (its very tensors under another name) is mfA in the transformer, the copy in the
    text encoders too (the policy ``All``)."""
    reference = within_floor(
        forge, f"{PROMPT} <lora:mfA:0.5> <lora:mfA2:0.5:0>", f"{PROMPT} <lora:mfA2:0.5:0> <lora:mfA:0.5>"
    )
    composite = gen(forge, f"{PROMPT} <lora:mfA:0.5> <lora:mfA2:0.5>", **multilora("Composite"))
    assert all(c["active"] == [0, 1] and c["diff_vs_mean"] <= 1e-5 for c in trace(forge))
    assert max_diff(reference, composite.image) <= SAME


@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_switch_with_tau_at_least_steps_equals_first_lora_in_the_transformer(forge: WebuiClient, layout: str) -> None:
    prompts = LAYOUTS[layout]
    reference = within_floor(forge, prompts["A unet"], prompts["A unet swapped"])
    switch = gen(forge, prompts["AB"], **multilora("Switch", tau=STEPS))
    calls = trace(forge)
    assert [c["active"] for c in calls] == [[0]] * STEPS
    names = ["mfA", "mfB"] if layout == "kohya" else ["mfdA", "mfdB"]
    # plain LoRAs stay merged, the hooks subtract the other (diffusers': on their slices of the fused q/k/v)
    assert all(c["patched"] == names for c in calls), calls
    assert max_diff(reference, switch.image) <= SAME
    assert mean_diff(gen(forge, prompts["AB"]).image, switch.image) > DIFFERENT, "differs from Merge"


@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_composite_output_is_mean_of_single_lora_outputs_each_step(forge: WebuiClient, layout: str) -> None:
    prompts = LAYOUTS[layout]
    result = gen(forge, prompts["AB"], **multilora("Composite"))
    calls = trace(forge)
    assert len(calls) == STEPS
    for c in calls:
        assert c["active"] == [0, 1]
        assert c["diff_vs_mean"] <= 1e-5, c
        assert c["spread"] > 1e-3, "the two LoRAs give different predictions"
    assert mean_diff(result.image, gen(forge, prompts["AB"]).image) > DIFFERENT, "Composite differs from Merge"


def test_batched_composite_equals_sequential_with_uncond_rows(forge: WebuiClient) -> None:
    """At CFG 3: each call's uncond and cond rows (text, pooled vector and guidance) replicated per LoRA."""
    composite = {**CFG3, **ml(method="Composite", execution="Sequential")}
    sequential = within_floor(forge, KOHYA["AB"], KOHYA["BA"], **composite)
    batched = gen(forge, KOHYA["AB"], **CFG3, **ml(method="Composite", execution="Batched"))
    calls = trace(forge)
    assert len(calls) == STEPS and all(c["active"] == [0, 1] and c["diff_vs_mean"] <= 1e-4 for c in calls), calls
    assert "running Composite sequentially" not in batched.infotext
    assert max_diff(sequential, batched.image) <= SAME


def test_disabled_is_bit_identical_to_forge_without_extension(
    forge: WebuiClient, forge_without_extension: WebuiClient
) -> None:
    """The second Forge (the probe only, the same model folders) runs the same Flux checkpoint for this test."""
    forge_without_extension.post("/sdapi/v1/refresh-checkpoints")
    forge_without_extension.post("/sdapi/v1/refresh-loras")
    with checkpoint(forge_without_extension, FLUX_NAME, warm_up={}):
        reference = forge_without_extension.txt2img(prompt=KOHYA["AB"], **FLUX)
    for extra in ({}, multilora("Composite", enabled=False)):
        ours = gen(forge, KOHYA["AB"], **extra)
        assert max_diff(ours.image, reference.image) == 0
        assert "Multi-LoRA" not in ours.infotext


def test_text_encoder_first_mutes_the_second_lora_in_clip_l_and_t5(forge: WebuiClient, flux: FluxModel) -> None:
    """``First``: the conds see mfA alone, through CLIP-L and T5; with Switch at tau >= steps the transformer does
    too, so the image is ``<lora:mfA:0.5>``'s. mfB's part in either text encoder alone (``mfB_te1``, ``mfB_te2``: its
    very tensors) changes the image clearly: left in either encoder, it fails the test."""
    reference = within_floor(forge, KOHYA["A"], KOHYA["A twice"])
    first = gen(forge, KOHYA["AB"], **ml(method="Switch", tau=STEPS, text_encoder="First"))
    assert "Multi-LoRA text encoder: First" in first.infotext
    assert max_diff(reference, first.image) <= SAME
    for part in ("mfB_te1", "mfB_te2"):
        assert mean_diff(reference, gen(forge, f"{KOHYA['A']} <lora:{part}:0.5>").image) > DIFFERENT, part


@pytest.mark.parametrize("layout", LAYOUT_IDS)
def test_no_trace_after_each_layout(forge: WebuiClient, layout: str) -> None:
    """kohya: Switch with the text-encoder policy (hooks on the merged weights, conds from a CLIP patcher of the
    policy's own); diffusers: Batched Composite (deltas on slices of the fused q/k/v)."""
    prompts = LAYOUTS[layout]
    run = lambda: gen(forge, prompts["AB"])  # noqa: E731 - the plain generation, run again by assert_no_trace
    before = snapshot(forge, run)
    if layout == "kohya":
        gen(forge, prompts["AB"], **ml(method="Switch", tau=1, text_encoder="First"))
    else:
        gen(forge, prompts["AB"], **ml(method="Composite", execution="Batched"))
    assert_no_trace(forge, run, before)


@pytest.mark.parametrize(("cfg", "rows"), [({}, [True]), (CFG3, [False, True])], ids=["cfg1", "cfg3"])
def test_spatial_is_the_formula_each_step_on_flux_latents(
    forge: WebuiClient, cfg: dict[str, Any], rows: list[bool]
) -> None:
    """Spatial mixes the 16-channel latent's predictions per 2x2 patch (the transformer's own patch size); at CFG 1
    every row is a cond row, at CFG 3 Forge batches the uncond row first."""
    result = gen(forge, KOHYA["AB"], **cfg, **ml(method="Spatial", patch=2))
    calls = trace(forge)
    assert len(calls) == STEPS and "Multi-LoRA method: Spatial" in result.infotext
    for c in calls:
        assert c["cond_rows"] == rows
        assert c["diff_vs_spatial"] <= 1e-5, c


def test_weights_and_the_window(forge: WebuiClient) -> None:
    weighted = gen(forge, KOHYA["AB"], **ml(method="Composite", weights="1,0"))
    assert [c["active"] for c in trace(forge)] == [[0]] * STEPS
    assert max_diff(weighted.image, gen(forge, KOHYA["AB"], **ml(method="Switch", tau=STEPS)).image) == 0
    gen(forge, KOHYA["AB"], **ml(method="Composite", end=0.5))
    assert [c["active"] for c in trace(forge)] == [[0, 1]] * (STEPS // 2) + [[]] * (STEPS // 2)


def test_hires_fix_and_img2img_follow_the_steps_they_run(forge: WebuiClient) -> None:
    hires = {
        "enable_hr": True,
        "hr_scale": 2,
        "hr_upscaler": "Latent",
        "hr_second_pass_steps": 2,
        "denoising_strength": 0.5,
        "hr_scheduler": "Simple",
        "hr_additional_modules": ["Use same choices"],  # Forge's API leaves it None, which its hires pass cannot read
    }
    result = gen(forge, KOHYA["AB"], **hires, **ml(method="Switch", tau=1))
    calls = trace(forge)
    steps = [c["step"] for c in calls]
    assert steps[:STEPS] == list(range(STEPS)) and steps[STEPS:] == list(range(len(calls) - STEPS))
    assert len(calls) > STEPS and [c["active"] for c in calls] == [[s % 2] for s in steps]
    assert result.image.shape == (128, 128, 3)
    init = gen(forge, PROMPT).image
    forge.img2img(prompt=KOHYA["AB"], init_images=[init], denoising_strength=0.5, **FLUX, **ml(method="Switch", tau=1))
    calls = trace(forge)
    assert 1 <= len(calls) < STEPS and [c["active"] for c in calls] == [[i % 2] for i in range(len(calls))]


def test_xyz_method_axis(forge: WebuiClient) -> None:
    script_args = xyz_args(axis_index(forge, "[Multi-LoRA] Method"), "Merge, Switch, Composite", REFORGE)
    result = forge.txt2img(prompt=KOHYA["AB"], **FLUX, script_name="x/y/z plot", script_args=script_args)
    cells = result.info["infotexts"][1:]
    assert [re.search(r"Multi-LoRA method: (\w+)", cell)[1] for cell in cells] == ["Merge", "Switch", "Composite"]
    assert [c["active"] for c in trace(forge)] == [[0, 1]] * STEPS, "the last cell ran Composite"
    assert max_diff(result.images[1], gen(forge, KOHYA["AB"]).image) == 0


def test_schnell(forge: WebuiClient) -> None:
    """FLUX.1-schnell's layout (no guidance embedding: Forge ignores the distilled scale, its sampling shift is
    schnell's): Switch with tau >= steps is the first LoRA in the transformer, Composite the per-step mean."""
    with checkpoint(forge, SCHNELL_NAME):
        reference = within_floor(forge, KOHYA["A unet"], KOHYA["A unet swapped"])
        assert forge.get("/multilora-probe/status")["model_type"] == "Flux"
        switch = gen(forge, KOHYA["AB"], **multilora("Switch", tau=STEPS))
        assert "Distilled CFG Scale" not in switch.infotext
        assert max_diff(reference, switch.image) <= SAME
        gen(forge, KOHYA["AB"], **multilora("Composite"))
        assert all(c["diff_vs_mean"] <= 1e-5 and c["spread"] > 1e-3 for c in trace(forge))


def test_chroma(forge: WebuiClient) -> None:
    """Chroma (Flux's blocks with a modulation network of their own, T5 alone, real CFG: 3 here, where Forge runs the
    cond and the uncond rows as calls of their own, their token counts differing): Forge takes the file for Chroma,
    Switch with tau >= steps is the first LoRA in the transformer, Composite over one LoRA is it and over two the
    per-step mean."""
    with checkpoint(forge, CHROMA_NAME):
        mark = forge.log_mark()
        reference = within_floor(forge, CHROMA["A unet"], CHROMA["A unet swapped"], **CFG3)
        log = forge.log_text(mark)
        assert re.findall(r"'(\w+)': \d+", parts(log)) == ["transformer", "vae", "text_encoder_2", "ignore"]
        assert "Missing:" not in log and "Unexpected:" not in log, log
        assert forge.get("/multilora-probe/status")["model_type"] == "Chroma"
        for name in ("mcA", "mcB"):
            assert_loaded(log, name, 20, 96)
        switch = gen(forge, CHROMA["AB"], **CFG3, **multilora("Switch", tau=STEPS))
        assert max_diff(reference, switch.image) <= SAME
        single = within_floor(forge, CHROMA["A"], CHROMA["A twice"], **CFG3)
        assert max_diff(single, gen(forge, CHROMA["A"], **CFG3, **multilora("Composite")).image) <= SAME
        gen(forge, CHROMA["AB"], **CFG3, **multilora("Composite"))
        calls = trace(forge)
        assert len(calls) == 2 * STEPS and all(c["diff_vs_mean"] <= 1e-5 and c["spread"] > 1e-3 for c in calls)


@pytest.mark.forge2_only(
    "reForge builds SD3 with ldm_patched's own SD3 (modules_forge/forge_loader.py ~390), whose text-encoder layers "
    "take no narrower weights: a test model would need CLIP-G at full size; Multi-LoRA refuses SD3 there by name"
)
def test_sd35(forge: WebuiClient) -> None:
    """SD3.5 (Forge's ``StableDiffusion3``: an MMDiT with q/k RMSNorm, CLIP-L, CLIP-G and T5, real CFG: 3 here),
    kohya-layout LoRAs on the joint blocks and CLIP-L: Forge takes the file for SD3 with its five parts, Switch with
    tau >= steps is the first LoRA in the transformer, Composite over one LoRA is it and over two the per-step mean,
    batched too (with the text-encoder policy), and nothing is left behind."""
    with checkpoint(forge, SD35_NAME):
        mark = forge.log_mark()
        reference = within_floor(forge, SD35["A unet"], SD35["A unet swapped"], **CFG3)
        log = forge.log_text(mark)
        assert re.findall(r"'(\w+)': \d+", parts(log)) == [
            "transformer",
            "vae",
            "text_encoder",
            "text_encoder_2",
            "text_encoder_3",
            "ignore",
        ]
        assert "Missing:" not in log and "Unexpected:" not in log, log
        assert forge.get("/multilora-probe/status")["model_type"] == "StableDiffusion3"
        for name in ("msA", "msB"):
            assert_loaded(log, name, 17, 48)
        assert reference.astype(np.float32).std() > 5, "a picture, not a flat one"
        switch = gen(forge, SD35["AB"], **CFG3, **multilora("Switch", tau=STEPS))
        assert "running without Multi-LoRA" not in switch.infotext, switch.infotext
        assert max_diff(reference, switch.image) <= SAME
        single = within_floor(forge, SD35["A"], SD35["A twice"], **CFG3)
        assert max_diff(single, gen(forge, SD35["A"], **CFG3, **multilora("Composite")).image) <= SAME
        composite = gen(forge, SD35["AB"], **CFG3, **multilora("Composite"))
        calls = trace(forge)
        assert calls and all(c["diff_vs_mean"] <= 1e-5 and c["spread"] > 1e-3 for c in calls), calls
        run = lambda: gen(forge, SD35["AB"], **CFG3)  # noqa: E731 - the plain generation, run again by assert_no_trace
        before = snapshot(forge, run)
        assert mean_diff(composite.image, before.images[0]) > DIFFERENT, "Composite differs from Merge"
        gen(forge, SD35["AB"], **CFG3, **ml(method="Composite", execution="Batched", text_encoder="First"))
        assert all(c["active"] == [0, 1] and c["diff_vs_mean"] <= 1e-4 for c in trace(forge))
        assert_no_trace(forge, run, before)
