"""LoRA Switch and LoRA Composite on an SDXL-architecture model inside a real Forge.

SDXL meets the extension where SD1 does not: two text encoders in one CLIP patcher (kohya ``lora_te1_``/``lora_te2_``),
a UNet with ``label_emb`` (the pooled CLIP-G and size conds arrive as ``y``, which batched Composite replicates with
the rows) and Forge's SDXL engine. The session's Forge is switched to the tiny SDXL checkpoint
(``tiny_model.py --sdxl``) for this module and back to the SD1 one after it, even on failure.

64x64, STEPS Euler steps, LoRAs at 0.5; "same image" and the noise floor as in helpers.py. CFG 1, as SDXL's few-step
checkpoints (Lightning, Turbo, DMD2) run: Forge then computes no uncond, neither its text encoding nor its UNet rows;
Batched == Sequential runs at CFG 7, where a call holds cond and uncond rows to replicate in order. Each new prompt
or text-encoder LoRA set costs full-size CLIP-G work (Forge merges the CLIP patcher's LoRAs again and encodes; it
keeps the last conds only), most of this module's time: consecutive tests share prompts where they can.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hosts.tier import assert_no_trace, snapshot
from webui.server import SAME, assert_noise_floor, max_diff, mean_diff, trace

from .helpers import DIFFERENT, PROMPT, assert_loaded, checkpoint, linked, ml, model_links, multilora
from .server import REFORGE, SKIP_REASON, build_assets, forge_dir_from_env, tracebacks
from .tiny_model import SDXL_NAME

if TYPE_CHECKING:
    from webui.server import Result, WebuiClient

    from .conftest import ForgeAssets

if forge_dir_from_env() is None:
    pytest.skip(SKIP_REASON, allow_module_level=True)

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.usefixtures("sdxl", "no_tracebacks")

STEPS = 3
A = f"{PROMPT} <lora:mlxA:0.5>"
AB = f"{PROMPT} <lora:mlxA:0.5> <lora:mlxB:0.5>"
BA = f"{PROMPT} <lora:mlxB:0.5> <lora:mlxA:0.5>"
#: mlxB in the text encoders only (Forge's ``<lora:name:te:unet>``): the UNet sees mlxA alone.
A_UNET = f"{PROMPT} <lora:mlxA:0.5> <lora:mlxB:0.5:0>"


@dataclass(frozen=True)
class SdxlModel:
    """The SDXL checkpoint the session's Forge runs for this module: its LoRAs' manifest entries, the first image it
    made and Forge's log from the checkpoint switch to that image (the model load)."""

    loras: dict[str, dict[str, Any]]
    first: Result
    load_log: str


def gen(forge: WebuiClient, prompt: str, **extra: Any) -> Result:
    """A 64x64 txt2img of STEPS Euler steps at CFG 1 (seed 1234)."""
    return forge.txt2img(prompt=prompt, **{"steps": STEPS, "cfg_scale": 1, **extra})


@pytest.fixture(scope="module")
def sdxl(
    forge: WebuiClient, forge_dir: Path, forge_assets: ForgeAssets, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SdxlModel]:
    """Build the SDXL model and its LoRAs, link them into the session server's checkpoint and LoRA dirs and make it
    the current model; afterwards switch back to the session's checkpoint and unlink the files
    (``helpers.checkpoint``, ``helpers.linked``)."""
    manifest = build_assets(forge_dir, tmp_path_factory.mktemp("forge-sdxl"), sdxl=True)
    with (
        linked(forge, model_links(manifest, forge_assets.ckpt.parent, forge_assets.lora_dir)),
        checkpoint(forge, SDXL_NAME),
    ):
        mark = forge.log_mark()
        first = gen(forge, PROMPT)  # Forge loads the selected checkpoint at the next generation
        yield SdxlModel(manifest["loras"], first, forge.log_text(mark))


@pytest.fixture(scope="module")
def reference_a(forge: WebuiClient) -> np.ndarray:
    """``<lora:mlxA:0.5>``'s image, within the noise floor of the same weight as two patch sets (0.3 + 0.2: Forge
    merges both, a mathematically equal reference)."""
    other = gen(forge, f"{PROMPT} <lora:mlxA:0.3> <lora:mlxA:0.2>").image
    reference = gen(forge, A).image
    assert_noise_floor(reference, other)
    return reference


def test_forge_loads_it_as_sdxl_and_it_renders(forge: WebuiClient, sdxl: SdxlModel) -> None:
    assert forge.get("/multilora-probe/status")["checkpoint"].startswith(SDXL_NAME)
    flags = forge.post("/multilora-probe/model-flags", {})  # no flag given: only answers them
    assert flags["is_sdxl"] and not flags["is_sd1"], flags
    if REFORGE:
        # ldm_patched's detection took it for SDXL (the flags) and its text encoders found every key but CLIP-L's
        # projection, which SDXL files do not have (nor SD1 ones: reForge says so for every checkpoint)
        missing = re.findall(r"missing keys: (\[.*?\])", sdxl.load_log)
        assert set(missing) <= {"['clip_l.text_projection']"}, sdxl.load_log
        assert "unexpected" not in sdxl.load_log.lower(), sdxl.load_log
    else:
        # huggingface_guess took it for SDXL (its parts are SDXL's four) and every key found its place
        parts = re.search(r"StateDict Keys: (\{.*?\})", sdxl.load_log)
        assert parts is not None, sdxl.load_log
        assert re.findall(r"'(\w+)': \d+", parts[1]) == ["unet", "vae", "text_encoder", "text_encoder_2", "ignore"]
        assert parts[1].endswith("'ignore': 0}"), parts[1]
        assert "Missing:" not in sdxl.load_log and "Unexpected:" not in sdxl.load_log, sdxl.load_log
    assert not tracebacks(sdxl.load_log)
    assert sdxl.first.image.astype(np.float32).std() > 5, "a picture, not a flat one"


def test_both_loras_match_every_module_and_change_the_image(forge: WebuiClient, sdxl: SdxlModel) -> None:
    """Forge matched every module of mlxA and mlxB, in the UNet and both text encoders (its own count of the keys it
    patched, none unmatched or skipped), and each LoRA changes the image."""
    mark = forge.log_mark()
    with_ab = gen(forge, AB)
    log = forge.log_text(mark)
    assert "unmatched keys" not in log and "Mismatch" not in log and "NOT LOADED" not in log, log
    for name in ("mlxA", "mlxB"):
        assert_loaded(log, name, sdxl.loras[name]["n_unet"], sdxl.loras[name]["n_te"])
    with_a = gen(forge, A)
    assert mean_diff(with_a.image, sdxl.first.image) > DIFFERENT
    assert mean_diff(with_ab.image, with_a.image) > DIFFERENT


def test_composite_over_one_lora_equals_plain_lora(forge: WebuiClient, reference_a: np.ndarray) -> None:
    composite = gen(forge, A, **multilora("Composite"))
    assert [c["active"] for c in trace(forge)] == [[0]] * STEPS, "the method ran every step"
    assert max_diff(reference_a, composite.image) <= SAME
    assert "only one LoRA" in composite.infotext


def test_text_encoder_first_mutes_the_second_lora_in_both_text_encoders(
    forge: WebuiClient, sdxl: SdxlModel, reference_a: np.ndarray
) -> None:
    """``First``: the conds see mlxA alone, through CLIP-L and CLIP-G; with Switch at tau >= steps the UNet does
    too, so the image is ``<lora:mlxA:0.5>``'s. mlxB's part in either text encoder alone (the ``mlxB_te1`` and
    ``mlxB_te2`` files: its very tensors) makes a clearly different image: left in either encoder, it fails the test."""
    first = gen(forge, AB, **ml(method="Switch", tau=STEPS, text_encoder="First"))
    assert "Multi-LoRA text encoder: First" in first.infotext
    assert max_diff(reference_a, first.image) <= SAME
    for part in ("mlxB_te1", "mlxB_te2"):
        mark = forge.log_mark()
        unmuted = gen(forge, f"{A} <lora:{part}:0.5>").image
        assert_loaded(forge.log_text(mark), part, 0, sdxl.loras[part]["n_te"])
        assert mean_diff(reference_a, unmuted) > DIFFERENT, part


def test_composite_output_is_mean_of_single_lora_outputs_each_step(forge: WebuiClient) -> None:
    result = gen(forge, AB, **multilora("Composite"))
    calls = trace(forge)
    assert len(calls) == STEPS
    for c in calls:
        assert c["active"] == [0, 1]
        assert c["diff_vs_mean"] <= 1e-5, c
        assert c["spread"] > 1e-3, "the two LoRAs give different predictions"
    assert mean_diff(result.image, gen(forge, AB).image) > DIFFERENT, "Composite differs from Merge"


def test_no_trace_after_switch_with_the_text_encoder_policy(forge: WebuiClient) -> None:
    """The UNet hooks on SDXL's layers, and the conds computed on a CLIP patcher of the policy's own (both encoders):
    none of it outlasts the generation. (Every method and execution leaves no trace on SD1: test_no_trace.py.)"""
    run = lambda: gen(forge, AB)  # noqa: E731 - the plain generation, run again by assert_no_trace
    before = snapshot(forge, run)
    gen(forge, AB, **ml(method="Switch", tau=1, text_encoder="First"))
    assert_no_trace(forge, run, before)


def test_switch_with_tau_at_least_steps_equals_first_lora_in_unet(forge: WebuiClient) -> None:
    switch = gen(forge, AB, **multilora("Switch", tau=STEPS))
    assert [c["active"] for c in trace(forge)] == [[0]] * STEPS
    assert mean_diff(gen(forge, AB).image, switch.image) > DIFFERENT, "differs from Merge"
    reference = gen(forge, A_UNET).image
    assert_noise_floor(reference, gen(forge, f"{PROMPT} <lora:mlxB:0.5:0> <lora:mlxA:0.5>").image)
    assert max_diff(reference, switch.image) <= SAME


def test_batched_composite_equals_sequential(forge: WebuiClient) -> None:
    """At CFG 7: each call's cond and uncond rows (cross-attention and the ``y`` vector) replicated per LoRA."""
    cfg = {"cfg_scale": 7}
    sequential = gen(forge, AB, **cfg, **ml(method="Composite", execution="Sequential")).image
    batched = gen(forge, AB, **cfg, **ml(method="Composite", execution="Batched"))
    calls = trace(forge)
    assert len(calls) == STEPS and all(c["active"] == [0, 1] and c["diff_vs_mean"] <= 1e-4 for c in calls), calls
    assert "running Composite sequentially" not in batched.infotext
    assert_noise_floor(sequential, gen(forge, BA, **cfg, **ml(method="Composite", execution="Sequential")).image)
    assert max_diff(sequential, batched.image) <= SAME
