"""Webui features that meet the engine where a code review found silently wrong images: a LoRA written twice,
Hypertile, manual cast and FP8 weights, tiling, cached hires conds, refused passes, model types the engine does not
cover, lora_functional with dyn, a refiner switch, deltas the merge reshapes, PLMS's counter, X/Y/Z infotext.

Comparisons of two computation paths run at LoRA strengths where the noise floor, measured in the same test as the
difference between two exact ways to compute the reference, is at most 1/255; "the same image" is then <= 2/255.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import pytest
from hosts.tier import axis_index, xyz_args

from .helpers import PROMPT, STEPS, gen, ml, require_tier
from .server import SAME, assert_noise_floor, max_diff, mean_diff, trace
from .test_no_trace import HIRES, assert_no_trace, plain, snapshot

if TYPE_CHECKING:
    from .conftest import WebuiAssets
    from .server import WebuiClient


require_tier()
np = pytest.importorskip("numpy")

pytestmark = pytest.mark.usefixtures("no_tracebacks")


def switch_first(**named: Any) -> dict[str, Any]:
    """Switch with tau >= steps: the first composed LoRA alone in the UNet, the whole run."""
    return ml(method="Switch", tau=STEPS, **named)


@contextmanager
def webui_options(webui: WebuiClient, values: dict[str, Any], defaults: dict[str, Any] | None = None) -> Iterator[None]:
    """Settings on for a block, put back after it. (``override_settings`` in a request is not enough: the webui only
    restores settings that were ever saved, so an override of one at its default stays on.) The API lists only saved
    settings: ``defaults`` are what the others go back to."""
    previous = {**(defaults or {}), **webui.get("/sdapi/v1/options")}
    webui.post("/sdapi/v1/options", values)
    try:
        yield
    finally:
        webui.post("/sdapi/v1/options", {key: previous[key] for key in values})


def assert_floor(a: Any, b: Any) -> None:
    assert_noise_floor(a.image, b.image)


# --------------------------------------------------------------------------------------------------------------------
# 1. the same LoRA twice in the prompt
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("twice", ["mlA", "mlLoha"])  # low-rank (kept merged) and dense (taken out) paths
def test_lora_written_twice_is_composed_at_the_weight_merge_gives_it(webui: WebuiClient, twice: str) -> None:
    w = 0.3  # written twice it acts at 0.6: at 0.5 (1.0) the LoHa's floor is 2/255
    # the other LoRA first: the twice-written one must be entirely gone from the UNet
    prompt = f"{PROMPT} <lora:mlB:{w}> <lora:{twice}:{w}> <lora:{twice}:{w}>"
    reference = gen(webui, f"{PROMPT} <lora:mlB:{w}> <lora:{twice}:{w}:0> <lora:{twice}:{w}:0>")
    assert_floor(reference, gen(webui, f"{PROMPT} <lora:{twice}:{w}:0> <lora:{twice}:{w}:0> <lora:mlB:{w}>"))
    result = gen(webui, prompt, **switch_first())
    assert f"{twice} appears 2 times in the prompt" in result.infotext
    assert max_diff(result.image, reference.image) <= SAME
    # the twice-written one first: it acts at twice its weight, as Merge applies it
    prompt = f"{PROMPT} <lora:{twice}:{w}> <lora:{twice}:{w}> <lora:mlB:{w}>"
    reference = gen(webui, f"{PROMPT} <lora:{twice}:{w}> <lora:{twice}:{w}> <lora:mlB:{w}:0>")
    assert_floor(reference, gen(webui, f"{PROMPT} <lora:mlB:{w}:0> <lora:{twice}:{w}> <lora:{twice}:{w}>"))
    once = gen(webui, f"{PROMPT} <lora:{twice}:{w}> <lora:mlB:{w}:0>")
    assert mean_diff(reference.image, once.image) > SAME, "written twice is not written once"
    assert max_diff(gen(webui, prompt, **switch_first()).image, reference.image) <= SAME


# --------------------------------------------------------------------------------------------------------------------
# 2. Hypertile
# --------------------------------------------------------------------------------------------------------------------

#: 256x256 (a 32x32 latent) with 128-pixel tiles: the first level's self-attention runs on 2x2 tiles (chosen at
#: random per call with the default swap size 3, so one discarded call would change every later tile)
SIZE = {"width": 256, "height": 256}


def test_hypertile_batched_composite_equals_sequential(webui: WebuiClient) -> None:
    ab = f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5>"
    without = gen(webui, ab, **SIZE, **ml(method="Composite"))
    tiles = {"hypertile_enable_unet": True, "hypertile_max_tile_unet": 128}
    with webui_options(webui, tiles, defaults={"hypertile_enable_unet": False, "hypertile_max_tile_unet": 256}):
        sequential = gen(webui, ab, **SIZE, **ml(method="Composite"))
        batched = gen(webui, ab, **SIZE, **ml(method="Composite", execution="Batched"))
    assert "Hypertile U-Net: True" in sequential.infotext
    assert mean_diff(sequential.image, without.image) > SAME, "Hypertile is on and changes the image"
    assert "Hypertile U-Net splits the batch inside the UNet; running Composite sequentially" in batched.infotext
    assert max_diff(batched.image, sequential.image) <= SAME


# --------------------------------------------------------------------------------------------------------------------
# 3. manual cast (fp8 weights with fp32 inference, GTX 16xx, MPS, XPU) and FP8 weight storage
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def manual_cast(webui: WebuiClient) -> Iterator[None]:
    assert webui.post("/multilora-probe/manual-cast", {"on": True})["manual_cast"]
    try:
        yield
    finally:
        assert not webui.post("/multilora-probe/manual-cast", {"on": False})["manual_cast"]


@pytest.mark.usefixtures("manual_cast")
def test_methods_run_and_hold_their_invariants_under_manual_cast(webui: WebuiClient) -> None:
    w = 0.5
    ab = f"{PROMPT} <lora:mlA:{w}> <lora:mlB:{w}>"
    reference = gen(webui, f"{PROMPT} <lora:mlA:{w}> <lora:mlB:{w}:0>")
    assert_floor(reference, gen(webui, f"{PROMPT} <lora:mlB:{w}:0> <lora:mlA:{w}>"))
    switch = gen(webui, ab, **switch_first())
    assert "Multi-LoRA method: Switch" in switch.infotext and "replaced torch.nn" not in switch.infotext
    assert [c["active"] for c in trace(webui)] == [[0]] * STEPS
    assert max_diff(switch.image, reference.image) <= SAME
    plain_a = gen(webui, f"{PROMPT} <lora:mlA:{w}>")
    composite = gen(webui, f"{PROMPT} <lora:mlA:{w}>", **ml(method="Composite"))
    assert "Multi-LoRA method: Composite" in composite.infotext
    assert max_diff(composite.image, plain_a.image) <= SAME


# --------------------------------------------------------------------------------------------------------------------
# 4. tiling: circular convs
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["mlA first", "mlLocon first"])
def test_tiling_switch_first_lora_alone_on_the_borders_too(webui: WebuiClient, order: str) -> None:
    w = 0.5
    first, second = ("mlA", "mlLocon") if order == "mlA first" else ("mlLocon", "mlA")
    reference = gen(webui, f"{PROMPT} <lora:{first}:{w}> <lora:{second}:{w}:0>", tiling=True)
    assert_floor(reference, gen(webui, f"{PROMPT} <lora:{second}:{w}:0> <lora:{first}:{w}>", tiling=True))
    untiled = gen(webui, f"{PROMPT} <lora:{first}:{w}> <lora:{second}:{w}:0>")
    assert mean_diff(reference.image, untiled.image) > SAME, "tiling is on and changes the image"
    result = gen(webui, f"{PROMPT} <lora:{first}:{w}> <lora:{second}:{w}>", tiling=True, **switch_first())
    border = np.ones(result.image.shape[:2], bool)
    border[8:-8, 8:-8] = False
    assert max_diff(result.image[border], reference.image[border]) <= SAME
    assert max_diff(result.image, reference.image) <= SAME


# --------------------------------------------------------------------------------------------------------------------
# 5, 6. the text-encoder policy: cached hires conds, the hires pass, a refused pass
# --------------------------------------------------------------------------------------------------------------------


def test_policy_conds_never_reach_the_webuis_shared_hires_cond_cache(webui: WebuiClient) -> None:
    ab = f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5>"
    with webui_options(webui, {"hires_fix_use_firstpass_conds": True}):
        other = f"{PROMPT} a dog {ab}"  # the webui's cache holds one entry: another prompt flushes ab out
        gen(webui, other, **HIRES)
        gen(webui, ab, **HIRES, **ml(method="Composite", text_encoder="None"))
        after_policy = gen(webui, ab, **HIRES)
        gen(webui, other, **HIRES)
        assert max_diff(after_policy.image, gen(webui, ab, **HIRES).image) == 0


@pytest.mark.parametrize("firstpass_conds", [False, True])
def test_policy_reaches_the_hires_pass_conds(webui: WebuiClient, firstpass_conds: bool) -> None:
    with webui_options(webui, {"hires_fix_use_firstpass_conds": firstpass_conds}):
        muted = gen(
            webui, f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5>", **HIRES, **ml(method="Composite", text_encoder="None")
        )
        assert len(trace(webui)) > STEPS, "both passes ran the method"
        # the same Composite with both LoRAs written without their text encoder part, policy All
        reference = gen(webui, f"{PROMPT} <lora:mlA:0:0.5> <lora:mlB:0:0.5>", **HIRES, **ml(method="Composite"))
    assert max_diff(muted.image, reference.image) == 0


def test_refused_pass_keeps_the_text_encoder_as_a_plain_generation(webui: WebuiClient) -> None:
    ab = f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5>"
    expected = gen(webui, ab)
    assert webui.post("/multilora-probe/foreign-linear-patch", {"on": True})["patched"]
    try:
        result = gen(webui, ab, **ml(method="Composite", text_encoder="None"))
    finally:
        assert not webui.post("/multilora-probe/foreign-linear-patch", {"on": False})["patched"]
    assert "replaced torch.nn.Linear.forward" in result.infotext
    assert max_diff(result.image, expected.image) == 0


# --------------------------------------------------------------------------------------------------------------------
# 7. model types the engine does not cover
# --------------------------------------------------------------------------------------------------------------------


def test_model_type_not_covered_is_refused_with_a_message(webui: WebuiClient) -> None:
    ab = f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5>"
    expected = gen(webui, ab)
    previous = webui.post("/multilora-probe/model-flags", {"is_sd1": False})
    assert previous["is_sd1"], "the tiny model is an SD1 model"
    try:
        result = gen(webui, ab, **ml(method="Switch", tau=1, text_encoder="None"))
    finally:
        webui.post("/multilora-probe/model-flags", previous)
    assert "models are not supported (SD1, SD2 and SDXL are); running without Multi-LoRA" in result.infotext
    assert "Multi-LoRA method" not in result.infotext and trace(webui) == []
    assert max_diff(result.image, expected.image) == 0


# --------------------------------------------------------------------------------------------------------------------
# 9. X/Y/Z cells share one dict of infotext params; a warning is written once
# --------------------------------------------------------------------------------------------------------------------


def test_xyz_cells_carry_only_their_own_infotext(webui: WebuiClient) -> None:
    x_type = axis_index(webui, "[Multi-LoRA] Method")
    prompt = f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5>"
    result = webui.txt2img(
        prompt=prompt, steps=STEPS, script_name="x/y/z plot", script_args=xyz_args(x_type, "Switch, Composite, Merge")
    )
    switch, composite, merge = result.info["infotexts"][1:]
    assert "Multi-LoRA switch every: 5" in switch
    assert "Multi-LoRA method: Composite" in composite and "Multi-LoRA switch every" not in composite
    assert "Multi-LoRA method: Merge" in merge and "Multi-LoRA LoRAs" not in merge


def test_a_warning_is_written_once(webui: WebuiClient) -> None:
    result = gen(webui, f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5>", **ml(method="Blend"))
    message = "unknown method 'Blend' (expected one of Switch, Composite, Spatial); running without Multi-LoRA"
    assert result.infotext.count(message) == 1, result.infotext


# --------------------------------------------------------------------------------------------------------------------
# 3b. FP8 weight storage
# --------------------------------------------------------------------------------------------------------------------


def test_fp8_weights_compose_outside_the_rounded_weights(webui: WebuiClient) -> None:
    """FP8 weight storage rounds every merge into the weights. The composed LoRAs are taken out of them for the pass
    and the hooks add them at compute precision, so Switch and Composite are not the fp8 plain LoRA: measured here
    against full precision."""
    w = 0.5
    ab, only_a = f"{PROMPT} <lora:mlA:{w}> <lora:mlB:{w}>", f"{PROMPT} <lora:mlA:{w}> <lora:mlB:{w}:0>"
    exact = gen(webui, only_a)
    try:
        with webui_options(webui, {"fp8_storage": "Enable"}):
            plain_a = gen(webui, only_a)  # the next generation reloads the model in fp8
            switch = gen(webui, ab, **switch_first())
            calls = trace(webui)
            assert [n["name"] for n in webui.loaded_networks()] == ["mlA", "mlB"], "the composed LoRAs are back"
            merge = gen(webui, ab)
    finally:
        gen(webui, PROMPT)  # reloads the model in full precision for the next test
    assert "FP8 weight: Enable" in plain_a.infotext
    assert [c["active"] for c in calls] == [[0]] * STEPS
    assert all(c["loaded"] == [] for c in calls), "the composed LoRAs are out of the fp8 weights for the pass"
    assert mean_diff(switch.image, merge.image) > SAME, "and it is not Merge"
    rounding, ours = mean_diff(plain_a.image, exact.image), mean_diff(switch.image, exact.image)
    fp8_vs_plain = (mean_diff(switch.image, plain_a.image), max_diff(switch.image, plain_a.image))
    print(
        f"fp8 (mean/max per pixel, /255): plain <lora:mlA> vs full precision {rounding:.2f}/"
        f"{max_diff(plain_a.image, exact.image)}; Switch vs full precision {ours:.2f}/"
        f"{max_diff(switch.image, exact.image)}; Switch vs fp8 plain {fp8_vs_plain[0]:.2f}/{fp8_vs_plain[1]}"
    )
    assert ours <= rounding, "adding the LoRA at compute precision is no farther from full precision than fp8's merge"


# --------------------------------------------------------------------------------------------------------------------
# 8. lora_functional with dyn, deltas the merge reshapes, a refiner switch, PLMS's counter
# --------------------------------------------------------------------------------------------------------------------


def test_lora_functional_ignores_dyn_and_so_do_the_hooks(webui: WebuiClient) -> None:
    w = 0.5
    with webui_options(webui, {"lora_functional": True}):
        reference = gen(webui, f"{PROMPT} <lora:mlB:{w}> <lora:mlA:{w}:0:2>")
        assert_floor(reference, gen(webui, f"{PROMPT} <lora:mlA:{w}:0:2> <lora:mlB:{w}>"))
        result = gen(webui, f"{PROMPT} <lora:mlB:{w}> <lora:mlA:{w}:{w}:2>", **switch_first())
    assert max_diff(result.image, reference.image) <= SAME


@pytest.fixture
def reshaped_lora(webui: WebuiClient, webui_assets: WebuiAssets) -> Iterator[str]:
    """mlReshaped: mlA with each feed-forward input projection's factors made for the transposed shape, which the
    merge accepts by reshaping (same element count): garbage for a real model, but what the merge does."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(webui_assets.loras["mlA"].path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not a mapping
        metadata = fh.metadata() or {}
    generator = torch.Generator().manual_seed(7)
    changed = [k for k in tensors if k.startswith("lora_unet_") and "_ff_net_0_proj.lora_down" in k]
    assert changed, "mlA has feed-forward LoRAs"
    for down_key in changed:
        up_key = down_key.replace("lora_down", "lora_up")
        (rank, d_in), d_out = tensors[down_key].shape, tensors[up_key].shape[0]
        assert d_in != d_out, "a non-square layer, so that the transposed shape differs"
        tensors[down_key] = torch.randn(rank, d_out, generator=generator) * tensors[down_key].std()
        tensors[up_key] = torch.randn(d_in, rank, generator=generator) * tensors[up_key].std()
    path = webui_assets.lora_dir / "mlReshaped.safetensors"
    save_file(tensors, str(path), metadata={**metadata, "ss_output_name": path.stem})
    webui.post("/sdapi/v1/refresh-loras")
    try:
        yield path.stem
    finally:
        path.unlink()
        webui.post("/sdapi/v1/refresh-loras")


def test_delta_the_merge_reshapes_is_composed_not_left_out(webui: WebuiClient, reshaped_lora: str) -> None:
    w = 0.5
    reference = gen(webui, f"{PROMPT} <lora:mlB:{w}> <lora:{reshaped_lora}:{w}:0>")
    assert_floor(reference, gen(webui, f"{PROMPT} <lora:{reshaped_lora}:{w}:0> <lora:mlB:{w}>"))
    result = gen(webui, f"{PROMPT} <lora:mlB:{w}> <lora:{reshaped_lora}:{w}>", **switch_first())
    assert "do not fit" not in result.infotext
    assert max_diff(result.image, reference.image) <= SAME


@pytest.mark.parametrize("second", ["mlB", "mlLoha"])  # kept merged, and taken out of the weights for the pass
def test_refiner_part_runs_as_the_webui_runs_it(
    webui: WebuiClient, alt_checkpoint: tuple[str, str], second: str
) -> None:
    w = 0.5
    prompt = f"{PROMPT} <lora:mlA:{w}> <lora:{second}:{w}>"
    _, alt = alt_checkpoint
    # from the first step on: the whole image is the refiner's, with every LoRA merged, as without Multi-LoRA
    at_start = {"refiner_checkpoint": alt, "refiner_switch_at": 0.0}
    expected = gen(webui, prompt, **at_start)
    assert "Refiner:" in expected.infotext
    assert_floor(expected, gen(webui, prompt, **at_start))
    assert max_diff(gen(webui, prompt, **at_start, **ml(method="Composite")).image, expected.image) <= SAME
    # half way: the method runs before the switch only, and nothing is left behind
    halfway = {"refiner_checkpoint": alt, "refiner_switch_at": 0.5}
    before = snapshot(webui, plain(webui, prompt, **halfway))
    result = gen(webui, prompt, **halfway, **ml(method="Composite"))
    assert 0 < len(trace(webui)) < STEPS
    assert "the refiner part runs without Multi-LoRA" in result.infotext
    assert_no_trace(webui, plain(webui, prompt, **halfway), before)


def test_refiner_of_the_same_checkpoint_changes_nothing(webui: WebuiClient, alt_checkpoint: tuple[str, str]) -> None:
    """The webui does not switch to a refiner that is the loaded checkpoint: the method runs every step."""
    original, _ = alt_checkpoint
    prompt = f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5>"
    same = {"refiner_checkpoint": original, "refiner_switch_at": 0.5}
    before = snapshot(webui, plain(webui, prompt, **same))
    result = gen(webui, prompt, **same, **ml(method="Composite"))
    assert len(trace(webui)) == STEPS and "refiner part" not in result.infotext
    assert max_diff(result.image, gen(webui, prompt, **ml(method="Composite")).image) == 0
    assert_no_trace(webui, plain(webui, prompt, **same), before)


def test_plms_extra_first_call_counts_as_the_webuis_step_counter_does(webui: WebuiClient) -> None:
    abc = f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5> <lora:mlC:0.5>"
    gen(webui, abc, sampler_name="PLMS", **ml(method="Switch", tau=1))
    calls = trace(webui)
    # PLMS calls the model twice at its first step; the webui's counter (prompt editing's too) counts both calls, so
    # its second call already runs the second LoRA (PLMS runs steps - 1 iterations: 8 calls for 8 steps)
    assert [c["step"] for c in calls] == list(range(STEPS))
    assert [c["active"] for c in calls] == [[s % 3] for s in range(STEPS)]
