"""Baseline facts about the host webui that every other real-webui test builds on.

These must hold for the plain webui with our extension installed but not enabled: the tiny model renders, the
built-in Lora extension matches every module of each test LoRA and each one visibly changes the image, results are
deterministic, and our script is registered for both tabs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from .helpers import PROMPT, require_tier

if TYPE_CHECKING:
    from .server import Result, WebuiClient
    from .tiny_lora import LoraInfo


require_tier()
np = pytest.importorskip("numpy")

pytestmark = pytest.mark.usefixtures("no_tracebacks")

LORA_NAMES = ("mlA", "mlB", "mlC", "mlLocon", "mlLoha")
SCRIPT_TITLE = "Multi-LoRA Composition"
#: Mean absolute per-channel difference (0..255) that counts as "a different image"; the test LoRAs give ~50.
MIN_DIFF = 2.0


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Average absolute pixel difference of two uint8 images."""
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.fixture(scope="module")
def baseline(webui: WebuiClient) -> Result:
    """The image for PROMPT with no LoRA, shared by the comparisons below."""
    return webui.txt2img(prompt=PROMPT)


def test_tiny_model_makes_a_real_image(baseline: Result) -> None:
    image = baseline.image
    assert len(baseline.images) == 1
    assert image.shape == (64, 64, 3)
    assert image.dtype == np.uint8
    assert image.std() > 10, "image is (nearly) constant: the random model lost its signal"
    assert baseline.info["seed"] == 1234
    assert "Seed: 1234" in baseline.infotext and "Size: 64x64" in baseline.infotext


def test_prompt_emphasis_has_no_nans(webui: WebuiClient) -> None:
    """Zero LayerNorm biases once made emphasised prompts NaN in the UNet; the webui would answer with an error."""
    result = webui.txt2img(prompt="(a photo:1.5) of [a cat], ((masterpiece))")
    assert result.image.std() > 10


def test_same_seed_is_bit_identical(webui: WebuiClient, baseline: Result) -> None:
    again = webui.txt2img(prompt=PROMPT)
    assert np.array_equal(again.image, baseline.image)
    other_seed = webui.txt2img(prompt=PROMPT, seed=4321)
    assert mean_abs_diff(other_seed.image, baseline.image) > MIN_DIFF


def test_prompt_changes_image(webui: WebuiClient, baseline: Result) -> None:
    """The text encoder matters, so text-encoder LoRA modules can have an effect."""
    other = webui.txt2img(prompt="a watercolor painting of a lighthouse at night")
    assert mean_abs_diff(other.image, baseline.image) > MIN_DIFF


def test_lora_tag_changes_image(webui: WebuiClient, baseline: Result) -> None:
    with_lora = webui.txt2img(prompt=f"{PROMPT} <lora:mlA:1>")
    assert mean_abs_diff(with_lora.image, baseline.image) > MIN_DIFF
    # and it goes away again: weights are restored once the tag is gone
    assert np.array_equal(webui.txt2img(prompt=PROMPT).image, baseline.image)


@pytest.mark.parametrize("name", LORA_NAMES)
def test_lora_loads_with_all_modules_matched(webui: WebuiClient, lora_infos: dict[str, LoraInfo], name: str) -> None:
    info = lora_infos[name]
    report = webui.probe_load([name])
    assert report["not_loaded"] == []
    (loaded,) = report["loaded"]
    assert loaded["name"] == name
    assert (loaded["n_unet_modules"], loaded["n_te_modules"]) == (info.n_unet_modules, info.n_te_modules)
    file_report = report["files"][name]
    assert file_report["unmatched_modules"] == []
    assert file_report["n_keys_failed_to_match"] == 0
    assert file_report["n_file_modules"] == info.n_modules
    assert webui.loaded_networks() == [], "the probe must leave no network loaded"


@pytest.mark.parametrize("name", LORA_NAMES)
def test_each_lora_changes_image(
    webui: WebuiClient, baseline: Result, lora_infos: dict[str, LoraInfo], name: str
) -> None:
    result = webui.txt2img(prompt=f"{PROMPT} <lora:{name}:1>")
    assert mean_abs_diff(result.image, baseline.image) > MIN_DIFF
    loaded = webui.loaded_networks()
    assert [(n["name"], n["te_multiplier"], n["unet_multiplier"]) for n in loaded] == [(name, 1.0, 1.0)]
    assert loaded[0]["n_modules"] == lora_infos[name].n_modules
    assert name not in webui.network_errors(), "the Lora extension failed to apply some layers"


def test_lora_weight_is_respected(webui: WebuiClient) -> None:
    """<lora:name:w> reaches the Lora extension as both multipliers, and weight 0 means no change."""
    webui.txt2img(prompt=f"{PROMPT} <lora:mlB:0.5>")
    assert [(n["name"], n["te_multiplier"], n["unet_multiplier"]) for n in webui.loaded_networks()] == [
        ("mlB", 0.5, 0.5)
    ]
    half = webui.txt2img(prompt=f"{PROMPT} <lora:mlB:0.5>").image
    full = webui.txt2img(prompt=f"{PROMPT} <lora:mlB:1>").image
    assert mean_abs_diff(half, full) > MIN_DIFF


def test_distinct_loras_give_distinct_images(webui: WebuiClient) -> None:
    a = webui.txt2img(prompt=f"{PROMPT} <lora:mlA:1>").image
    b = webui.txt2img(prompt=f"{PROMPT} <lora:mlB:1>").image
    assert mean_abs_diff(a, b) > MIN_DIFF


def test_img2img_runs(webui: WebuiClient, baseline: Result) -> None:
    result = webui.img2img(prompt=PROMPT, init_images=[baseline.image], denoising_strength=0.5)
    assert result.image.shape == (64, 64, 3)
    assert result.image.std() > 10
    again = webui.img2img(prompt=PROMPT, init_images=[baseline.image], denoising_strength=0.5)
    assert np.array_equal(result.image, again.image)


def test_extension_script_is_listed(webui: WebuiClient) -> None:
    scripts = webui.scripts()
    assert SCRIPT_TITLE.lower() in scripts["txt2img"]
    assert SCRIPT_TITLE.lower() in scripts["img2img"]
