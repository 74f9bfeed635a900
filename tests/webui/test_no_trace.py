"""Leave no trace: whatever happens to a Switch or Composite generation, the model ends up exactly as a plain
generation of the same prompt leaves it, and the next plain image is bit-identical.

Each test takes a snapshot (images of a plain generation, then the probe's fingerprint: checksums of every UNet and
text-encoder weight and of what the built-in believes is merged, the forward-hook count, the loaded networks), does
the thing (interrupt, an exception inside the pass, a checkpoint switch, hires fix, batches, img2img), then checks
the fingerprint and a new plain generation against the snapshot. Also bad input that test_methods.py does not cover.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hosts.tier import assert_no_trace, interrupted, snapshot

from .helpers import PROMPT, STEPS, TITLE, gen, multilora, require_tier
from .server import DEFAULT_TXT2IMG, WebuiClient, max_diff, mean_diff, trace, tracebacks
from .test_methods import AB

if TYPE_CHECKING:
    from .conftest import WebuiAssets
    from .server import Result


clean = pytest.mark.usefixtures("no_tracebacks")

require_tier()
np = pytest.importorskip("numpy")

METHODS = ("Switch", "Composite")
ABC = f"{PROMPT} <lora:mlA:1> <lora:mlB:1> <lora:mlC:1>"
LONG_STEPS = 200  # an interrupted run stops after a few of these; uninterrupted it would take minutes
HIRES: dict[str, Any] = {
    "enable_hr": True,
    "hr_scale": 2,
    "hr_second_pass_steps": 4,
    "denoising_strength": 0.5,
    "hr_upscaler": "Latent",
}
BATCH: dict[str, Any] = {"batch_size": 2, "n_iter": 2}
BATCH_STEPS = 4  # four images per generation: fewer steps keep the test short
#: Printed by probe_extension/scripts/multilora_faults.py when it raises inside the pass.
FAULT_MESSAGE = "multilora probe: injected failure"


def plain(webui: WebuiClient, prompt: str = AB, **extra: Any) -> Callable[[], Result]:
    return lambda: gen(webui, prompt, **extra)


# --------------------------------------------------------------------------------------------------------------------
# interrupt, exception, checkpoint switch
# --------------------------------------------------------------------------------------------------------------------


@clean
@pytest.mark.parametrize("method", METHODS)
def test_interrupt_mid_pass(webui: WebuiClient, method: str) -> None:
    before = snapshot(webui, plain(webui))
    result = interrupted(
        webui, lambda client: client.txt2img(prompt=AB, steps=LONG_STEPS, **multilora(method, tau=1)), LONG_STEPS
    )
    assert f"Multi-LoRA method: {method}" in result.infotext
    assert_no_trace(webui, plain(webui), before)


@pytest.mark.parametrize("method", METHODS)
def test_exception_inside_pass(webui: WebuiClient, method: str) -> None:
    """The probe raises from inside the pass at step 3: the request fails, nothing else does."""
    before = snapshot(webui, plain(webui))
    mark = webui.log_mark()
    webui.post("/multilora-probe/fail-at", {"step": 3})
    body = {**DEFAULT_TXT2IMG, "prompt": AB, "steps": STEPS, **multilora(method, tau=1)}
    response = webui.request("POST", "/sdapi/v1/txt2img", json=body)
    assert response.status_code == 500 and FAULT_MESSAGE in response.text
    assert [c["step"] for c in trace(webui)] == [0, 1, 2, 3]
    assert_no_trace(webui, plain(webui), before)
    assert webui.get("/multilora-probe/status")["model_loaded"]
    # the only report in the log is the API's for the injected fault
    log = webui.log_text(mark)
    report = rf"^\*\*\* API error: [^\n]*{FAULT_MESSAGE}.*?^---$"
    assert re.search(report, log, re.M | re.S), log[-3000:]
    assert not tracebacks(re.sub(report, "", log, flags=re.M | re.S))


@clean
def test_checkpoint_switch_between_generations(webui: WebuiClient, alt_checkpoint: tuple[str, str]) -> None:
    original, alt = alt_checkpoint
    before = snapshot(webui, plain(webui))
    gen(webui, AB, **multilora("Composite"))
    webui.post("/sdapi/v1/options", {"sd_model_checkpoint": alt})
    assert webui.get("/multilora-probe/status")["checkpoint"] == alt
    on_alt = snapshot(webui, plain(webui))
    assert on_alt.fingerprint["weights"] != before.fingerprint["weights"]
    gen(webui, AB, **multilora("Composite"))
    calls = trace(webui)
    assert len(calls) == STEPS and all(c["spread"] > 1e-3 for c in calls), "hooks act on the new model's layers"
    assert_no_trace(webui, plain(webui), on_alt)
    webui.post("/sdapi/v1/options", {"sd_model_checkpoint": original})
    assert webui.get("/multilora-probe/status")["checkpoint"] == original
    gen(webui, AB)  # a fresh load has nothing merged: one plain generation first, as in `before`
    assert_no_trace(webui, plain(webui), before)


# --------------------------------------------------------------------------------------------------------------------
# hires fix, batches, img2img
# --------------------------------------------------------------------------------------------------------------------


@clean
@pytest.mark.parametrize("method", METHODS)
def test_hires_fix_runs_both_passes_and_leaves_no_trace(webui: WebuiClient, method: str) -> None:
    before = snapshot(webui, plain(webui, **HIRES))
    result = gen(webui, AB, **HIRES, **multilora(method, tau=1))
    calls = trace(webui)
    steps = list(range(STEPS)) + list(range(HIRES["hr_second_pass_steps"]))  # the hires schedule restarts
    assert [c["step"] for c in calls] == steps, "first pass, then hires pass"
    expected = [[i % 2] for i in steps] if method == "Switch" else [[0, 1]] * len(steps)
    assert [c["active"] for c in calls] == expected
    assert result.image.shape == (128, 128, 3)
    assert mean_diff(result.image, before.images[0]) > 2, "differs from Merge"
    assert_no_trace(webui, plain(webui, **HIRES), before)


@clean
@pytest.mark.parametrize("method", METHODS)
def test_batch_and_iterations(webui: WebuiClient, method: str) -> None:
    def run(**extra: Any) -> Result:
        return webui.txt2img(prompt=AB, steps=BATCH_STEPS, **extra)

    before = snapshot(webui, lambda: run(**BATCH))
    result = run(**BATCH, **multilora(method, tau=1))
    assert len(result.images) == 4
    assert len(trace(webui)) == 2 * BATCH_STEPS, "one pass per iteration, the batch in one call per step"
    again = run(**BATCH, **multilora(method, tau=1))
    assert all(max_diff(a, b) == 0 for a, b in zip(again.images, result.images, strict=True)), "deterministic"
    for image, merged in zip(result.images, before.images, strict=True):
        assert mean_diff(image, merged) > 2, "differs from Merge"
    assert mean_diff(result.images[0], result.images[1]) > 2, "each image has its own seed"
    # the last image (2nd iteration, 2nd in batch) equals a single generation of its seed: batching changes only
    # float rounding, as it does for plain generations
    single = run(seed=DEFAULT_TXT2IMG["seed"] + 3, **multilora(method, tau=1))
    assert max_diff(single.image, result.images[3]) <= 2
    assert_no_trace(webui, lambda: run(**BATCH), before)


@clean
def test_img2img_composite_leaves_no_trace(webui: WebuiClient) -> None:
    init = gen(webui, PROMPT).image

    def img2img(**extra: Any) -> Result:
        return webui.img2img(prompt=AB, init_images=[init], steps=STEPS, denoising_strength=0.75, **extra)

    before = snapshot(webui, img2img)
    result = img2img(**multilora("Composite"))
    calls = trace(webui)
    assert 0 < len(calls) < STEPS and all(c["active"] == [0, 1] and c["diff_vs_mean"] <= 1e-5 for c in calls)
    assert mean_diff(result.image, before.images[0]) > 2, "differs from Merge"
    assert_no_trace(webui, img2img, before)


# --------------------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------------------


@clean
def test_huge_tau_runs_first_lora_only(webui: WebuiClient) -> None:
    reference = gen(webui, f"{PROMPT} <lora:mlA:1> <lora:mlB:1:0>")  # B only in the text encoder
    result = gen(webui, AB, **multilora("Switch", tau=10**9))
    assert [c["active"] for c in trace(webui)] == [[0]] * STEPS
    assert "Multi-LoRA switch every: 1000000000" in result.infotext
    assert max_diff(reference.image, result.image) <= 2


@clean
def test_non_integer_tau_via_api_warns_and_runs_plain(webui: WebuiClient) -> None:
    result = gen(webui, AB, **multilora("Switch", tau=2.5))
    assert "bad script args" in result.infotext and "2.5" in result.infotext
    assert "Multi-LoRA method" not in result.infotext
    assert max_diff(result.image, gen(webui, AB).image) == 0


@clean
def test_surplus_api_args_are_dropped_by_the_webui(webui: WebuiClient) -> None:
    """The API copies at most as many args as the panel has components, so extra args never reach the script."""
    info = next(s for s in webui.get("/sdapi/v1/script-info") if s["name"] == TITLE.lower() and not s["is_img2img"])
    args = [True, "Composite", *[a["value"] for a in info["args"][2:]]]
    exact = gen(webui, AB, alwayson_scripts={TITLE: {"args": args}})
    surplus = gen(webui, AB, alwayson_scripts={TITLE: {"args": [*args, "surplus", 7]}})
    assert "Multi-LoRA method: Composite" in surplus.infotext and "warning" not in surplus.infotext
    assert max_diff(exact.image, surplus.image) == 0


@clean
def test_unknown_named_api_arg_warns_and_runs_plain(webui: WebuiClient) -> None:
    result = gen(webui, AB, alwayson_scripts={TITLE: {"args": [{"enabled": True, "method": "Composite", "bogus": 1}]}})
    assert "bad script args" in result.infotext and "bogus" in result.infotext
    assert max_diff(result.image, gen(webui, AB).image) == 0


@clean
def test_same_lora_twice_is_composed_once_and_leaves_no_trace(webui: WebuiClient) -> None:
    # weights 0.5: with three full-strength LoRAs the random model amplifies float rounding (merge order alone moves
    # pixels by ~60), and the last check compares two different float paths
    twice = f"{PROMPT} <lora:mlA:0.5> <lora:mlA:0.5> <lora:mlB:0.5>"
    before = snapshot(webui, plain(webui, twice))
    result = gen(webui, twice, **multilora("Composite"))
    assert "mlA appears 2 times in the prompt: the webui merges it 2 times" in result.infotext
    assert [c["active"] for c in trace(webui)] == [[0, 1]] * STEPS
    assert max_diff(result.image, gen(webui, twice, **multilora("Composite")).image) == 0
    assert_no_trace(webui, plain(webui, twice), before)
    # composing only mlB leaves both mlA entries merged, exactly as the plain prompt merges them
    only_b = gen(webui, twice, **multilora("Composite", loras="mlB"))
    assert max_diff(only_b.image, before.images[0]) <= 2


@clean
def test_more_loras_than_steps(webui: WebuiClient) -> None:
    def two_steps(**extra: Any) -> Result:
        return webui.txt2img(prompt=ABC, steps=2, **extra)

    before = snapshot(webui, two_steps)
    result = two_steps(**multilora("Switch", tau=1))
    assert [c["active"] for c in trace(webui)] == [[0], [1]], "mlC never gets a step"
    assert "mlC got no step" in result.infotext, "and the user is told"
    assert "Multi-LoRA LoRAs: mlA, mlB, mlC" in result.infotext or '"mlA, mlB, mlC"' in result.infotext
    assert max_diff(result.image, two_steps(**multilora("Switch", tau=1)).image) == 0
    assert_no_trace(webui, two_steps, before)


@clean
def test_tag_text_is_never_evaluated(webui: WebuiClient, tmp_path: Path) -> None:
    marker = tmp_path / "evaluated"
    result = gen(webui, f"{AB} <multilora:switch:__import__('os').system('touch {marker}')>")
    assert "Multi-LoRA warning" in result.infotext and "tau must be a whole number" in result.infotext
    assert not marker.exists()
    assert max_diff(result.image, gen(webui, AB).image) == 0


def _write_corrupt(path: Path) -> None:
    """A safetensors file with a valid header (so the webui lists it) and truncated data (so loading it fails)."""
    header = json.dumps({"lora_unet_x.lora_down.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(10))


def _write_misfit(source: Path, bad: Path, fit: Path) -> None:
    """From ``source``: ``bad`` with every UNet self-attention module widened by 8 input features (a LoRA for another
    base model), ``fit`` with those modules left out (what the webui's merge applies of ``bad``)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not a mapping
        metadata = fh.metadata() or {}
    changed = {k for k in tensors if k.startswith("lora_unet_") and "_attn1_" in k}
    assert changed, f"{source.name} has no UNet self-attention modules"
    inputs = ("lora_down.weight", "hada_w1_b", "hada_w2_b")  # the factors whose dim 1 is the layer's input
    widened = {
        k: torch.cat([v, v[:, :8]], dim=1) if k in changed and k.endswith(inputs) else v for k, v in tensors.items()
    }
    for path, out in ((bad, widened), (fit, {k: v for k, v in tensors.items() if k not in changed})):
        save_file(out, str(path), metadata={**metadata, "ss_output_name": path.stem})


@pytest.fixture
def odd_loras(webui: WebuiClient, webui_assets: WebuiAssets) -> Iterator[None]:
    """mlCorrupt (fails to load), mlBadB/mlBadLoha (some layers of the wrong shape) and their mlFitB/mlFitLoha
    references in the LoRA dir for one test; removed afterwards."""
    lora_dir = webui_assets.lora_dir
    made = [lora_dir / "mlCorrupt.safetensors"]
    _write_corrupt(made[0])
    for source, suffix in (("mlB", "B"), ("mlLoha", "Loha")):
        bad, fit = lora_dir / f"mlBad{suffix}.safetensors", lora_dir / f"mlFit{suffix}.safetensors"
        _write_misfit(webui_assets.loras[source].path, bad, fit)
        made += [bad, fit]
    webui.post("/sdapi/v1/refresh-loras")
    try:
        yield
    finally:
        for path in made:
            path.unlink()
        webui.post("/sdapi/v1/refresh-loras")


@pytest.mark.usefixtures("odd_loras")
def test_lora_that_fails_to_load(webui: WebuiClient) -> None:
    mark = webui.log_mark()
    prompt = f"{AB} <lora:mlCorrupt:1>"
    named = gen(webui, prompt, **multilora("Composite", loras="mlA, mlCorrupt"))
    assert "not loaded by the prompt: mlCorrupt" in named.infotext and "Multi-LoRA method" not in named.infotext
    assert max_diff(named.image, gen(webui, prompt).image) == 0
    composed = gen(webui, prompt, **multilora("Composite"))  # every LoRA that loaded: mlA, mlB
    assert "Multi-LoRA LoRAs: mlA, mlB" in composed.infotext or '"mlA, mlB"' in composed.infotext
    assert max_diff(composed.image, gen(webui, AB, **multilora("Composite")).image) == 0
    # the webui reports the failed load (with a traceback) each time; nothing else may
    found = tracebacks(webui.log_text(mark))
    assert found and all("mlCorrupt.safetensors" in t and "lib_multilora" not in t for t in found), found


@clean
@pytest.mark.usefixtures("odd_loras")
@pytest.mark.parametrize("suffix", ["B", "Loha"])
def test_lora_with_misfit_layers_runs_like_merge_skips_them(webui: WebuiClient, suffix: str) -> None:
    """Layers whose delta does not fit are left out, as the webui's merge leaves them out (no failed generation).
    Composite only: which layers get a delta is decided before the method matters."""
    bad, fit = f"{PROMPT} <lora:mlA:1> <lora:mlBad{suffix}:1>", f"{PROMPT} <lora:mlA:1> <lora:mlFit{suffix}:1>"
    assert max_diff(gen(webui, bad).image, gen(webui, fit).image) == 0, "the reference: Merge skips those layers"
    expected = gen(webui, fit, **multilora("Composite")).image
    before = snapshot(webui, plain(webui, bad))
    result = gen(webui, bad, **multilora("Composite"))
    assert f"mlBad{suffix}: " in result.infotext and "do not fit this model" in result.infotext
    assert [c["active"] for c in trace(webui)] == [[0, 1]] * STEPS
    assert max_diff(result.image, expected) == 0
    assert_no_trace(webui, plain(webui, bad), before)
