"""Spatial Composite (issue 13, item 3; lib_multilora/spatial.py has the definition): per patch, the LoRA that moves
the noise prediction furthest from the base (no composed LoRA) leads; N+1 UNet passes per step."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from .helpers import PROMPT, STEPS, gen, ml, require_tier
from .server import assert_noise_floor, max_diff, trace

if TYPE_CHECKING:
    from .conftest import WebuiAssets
    from .server import WebuiClient


require_tier()

pytestmark = pytest.mark.usefixtures("no_tracebacks")

AB = f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5>"


@pytest.fixture
def lora_copy(webui: WebuiClient, webui_assets: WebuiAssets) -> Iterator[str]:
    """mlAcopy: mlA's file under another name."""
    path = webui_assets.lora_dir / "mlAcopy.safetensors"
    shutil.copyfile(webui_assets.loras["mlA"].path, path)
    webui.post("/sdapi/v1/refresh-loras")
    try:
        yield path.stem
    finally:
        path.unlink()
        webui.post("/sdapi/v1/refresh-loras")


def test_each_step_is_the_formula_on_the_single_lora_and_base_outputs(webui: WebuiClient) -> None:
    result = gen(webui, AB, **ml(method="Spatial"))
    calls = trace(webui)
    assert len(calls) == STEPS
    for c in calls:
        assert c["active"] == [0, 1] and c["cond_rows"] == [True, False]
        assert c["diff_vs_spatial"] <= 1e-5, c  # the probe recomputes spatial_mix from fresh e_0, e_1, e_2
    assert max(c["diff_vs_mean"] for c in calls) > 1e-3, "the mix is not the plain mean"
    assert "Multi-LoRA method: Spatial" in result.infotext and "Multi-LoRA spatial patch: 8" in result.infotext


def test_cond_rows_of_an_and_prompt_and_a_batch(webui: WebuiClient) -> None:
    gen(webui, f"{AB} AND a red ball :0.6", batch_size=2, **ml(method="Spatial"))
    calls = trace(webui)
    assert all(c["cond_rows"] == [True] * 4 + [False] * 2 for c in calls), calls[0]
    assert all(c["diff_vs_spatial"] <= 1e-5 for c in calls)


def test_a_huge_temperature_is_composite(webui: WebuiClient) -> None:
    assert_noise_floor(gen(webui, AB).image, gen(webui, f"{PROMPT} <lora:mlB:0.5> <lora:mlA:0.5>").image)
    spatial = gen(webui, AB, **ml(method="Spatial", temperature=1e9))
    assert all(c["diff_vs_mean"] <= 1e-4 for c in trace(webui))
    assert max_diff(spatial.image, gen(webui, AB, **ml(method="Composite")).image) <= 2


def test_a_lora_and_its_copy_are_that_lora(webui: WebuiClient, lora_copy: str) -> None:
    reference = gen(webui, f"{PROMPT} <lora:mlA:0.5> <lora:{lora_copy}:0.5:0>")  # the copy: text encoder only
    assert_noise_floor(reference.image, gen(webui, f"{PROMPT} <lora:{lora_copy}:0.5:0> <lora:mlA:0.5>").image)
    spatial = gen(webui, f"{PROMPT} <lora:mlA:0.5> <lora:{lora_copy}:0.5>", **ml(method="Spatial"))
    assert max_diff(spatial.image, reference.image) <= 2


def test_batched_spatial_equals_sequential(webui: WebuiClient) -> None:
    sequential = gen(webui, AB, **ml(method="Spatial"))
    batched = gen(webui, f"{AB} <multilora:spatial:patch=8:temperature=0.05>", **ml(execution="Batched"))
    assert "Multi-LoRA warning" not in batched.infotext, batched.infotext
    assert max_diff(batched.image, sequential.image) <= 2


def test_tag_settings_and_a_sampler_without_denoised_outputs(webui: WebuiClient) -> None:
    tagged = gen(webui, f"{AB} <multilora:spatial:patch=4:temperature=0.1>")
    assert "Multi-LoRA spatial patch: 4" in tagged.infotext and "Multi-LoRA spatial temperature: 0.1" in tagged.infotext
    ddim = gen(webui, AB, sampler_name="DDIM", **ml(method="Spatial"))
    assert "Spatial needs a k-diffusion sampler (DDIM is not one); running Composite" in ddim.infotext
    assert max_diff(ddim.image, gen(webui, AB, sampler_name="DDIM", **ml(method="Composite")).image) == 0
