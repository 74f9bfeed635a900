"""LoRA Switch and LoRA Composite on quantized Flux weights inside a real Forge: fp8 (e4m3fn storage), GGUF Q8_0 and
Q6_K (a K-quant), with the LoRAs merged into them (Forge dequantizes, merges and quantizes again) or applied online
(its "fp16 LoRA" options: merged into a copy of the weight in every forward).

The pass takes the composed LoRAs out of its patcher either way and adds them by hooks that never read the weights
(plain LoRAs: other types are refused by name), so each method computes what Forge's online mode computes: the
reference is Forge's own online generation of the first LoRA in the transformer, its noise floor (the LoRAs' order
swapped) measured in the test, and the methods match it with the LoRAs online or merged. Forge's merge rounds a LoRA
into fp8 or Q8_0 weights: Merge's images differ from online ones by that rounding, which the methods skip.

GGUF files hold the transformer alone, as city96's Flux GGUFs do; the VAE and text encoders are Forge's "VAE / Text
Encoder" modules, files of their own (``tiny_dit.py``), chosen for the module through the probe as Forge's UI does.
Flux-dev settings, 64x64, 4 steps, LoRAs at 0.5 (test_flux.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from hosts.tier import assert_no_trace, snapshot
from webui.server import DEFAULT_TXT2IMG, SAME, max_diff, trace

from .flux_helpers import FLUX, KOHYA, LAYOUTS, STEPS, gen, within_floor
from .helpers import PROMPT, additional_modules, checkpoint, linked, ml, model_links, multilora, unet_storage
from .server import SKIP_REASON, forge_dir_from_env, tracebacks
from .tiny_dit import FLUX_NAME

if TYPE_CHECKING:
    from webui.server import WebuiClient

    from .conftest import ForgeAssets

if forge_dir_from_env() is None:
    pytest.skip(SKIP_REASON, allow_module_level=True)

np = pytest.importorskip("numpy")

pytestmark = [
    pytest.mark.usefixtures("quantized"),
    pytest.mark.forge2_only("Diffusion in Low Bits is Forge's, and reForge does not generate with Flux (test_flux.py)"),
]

Q8_0, Q6_K = f"{FLUX_NAME}-Q8_0", f"{FLUX_NAME}-Q6_K"
ONLINE = "Automatic (fp16 LoRA)"
#: mfA and the LoHa: a patch type whose delta Forge computes from the weight.
WITH_LOHA = f"{PROMPT} <lora:mfA:0.5> <lora:mfLoha:0.5>"


@pytest.fixture(scope="module")
def quantized(forge: WebuiClient, forge_assets: ForgeAssets, flux_assets: dict[str, Any]) -> Iterator[None]:
    """The Flux files linked into the session server's model dirs, the GGUF Q8_0 transformer the current model with
    the Flux VAE and text encoders as modules; afterwards no modules, the session's checkpoint again (loaded), the
    files unlinked."""
    links = model_links(flux_assets, forge_assets.ckpt.parent, forge_assets.lora_dir)
    with (
        linked(forge, links),
        checkpoint(forge, Q8_0, warm_up={}),
        additional_modules(forge, list(flux_assets["modules"].values())),
    ):
        yield


def online_reference(forge: WebuiClient, prompts: dict[str, str] = KOHYA) -> np.ndarray:
    """Forge's own online generation of the first LoRA alone in the transformer (the second in the text encoders),
    within the noise floor of the same with the LoRAs' order swapped."""
    return within_floor(forge, prompts["A unet"], prompts["A unet swapped"])


def assert_methods_match(forge: WebuiClient, reference: np.ndarray, prompts: dict[str, str] = KOHYA) -> None:
    """Switch with tau >= steps is ``reference``, the composed LoRAs taken out of the patcher, and Composite is the
    per-step mean of the single-LoRA outputs."""
    switch = gen(forge, prompts["AB"], **multilora("Switch", tau=STEPS))
    assert "Multi-LoRA method: Switch" in switch.infotext
    calls = trace(forge)
    assert [c["active"] for c in calls] == [[0]] * STEPS and all(c["patched"] == [] for c in calls), calls
    assert max_diff(reference, switch.image) <= SAME
    gen(forge, prompts["AB"], **multilora("Composite"))
    assert all(c["diff_vs_mean"] <= 1e-5 and c["spread"] > 1e-3 for c in trace(forge))


def assert_loha_refused(forge: WebuiClient, where: str) -> None:
    """A LoHa among the composed LoRAs is refused, named, and the image is plain (the text-encoder policy on: the
    refusal comes before it, so the text encoder is left whole too)."""
    plain = gen(forge, WITH_LOHA)
    refused = gen(forge, WITH_LOHA, **ml(method="Switch", tau=1, text_encoder="None"))
    assert f"mfLoha: only plain LoRAs can be composed on UNet weights {where}" in refused.infotext, refused.infotext
    assert max_diff(plain.image, refused.image) == 0 and "Multi-LoRA method" not in refused.infotext


@pytest.mark.usefixtures("no_tracebacks")
def test_gguf_q8_0_online_and_merged(forge: WebuiClient) -> None:
    """Q8_0: online, the methods match Forge's online generation in both LoRA layouts and a LoHa is refused; merged
    (Forge requantizes the weights with the LoRAs), they still match it, and the requantized weights are put back as
    Forge's own merge leaves them."""
    mark = forge.log_mark()
    with unet_storage(forge, ONLINE):
        reference = online_reference(forge)
        log = forge.log_text(mark)
        assert "Using Detected UNet Type: gguf" in log and "'storage_dtype': 'gguf'" in log, log
        assert "Missing:" not in log and "Unexpected:" not in log, log
        assert_methods_match(forge, reference)
        diffusers = LAYOUTS["diffusers"]  # q, k and v as slices of the fused weight: low rank, no weight read
        assert_methods_match(forge, online_reference(forge, diffusers), diffusers)
        assert_loha_refused(forge, "stored as gguf")
        before = snapshot(forge, lambda: gen(forge, KOHYA["AB"]))
        gen(forge, KOHYA["AB"], **ml(method="Composite", execution="Batched"))
        assert_no_trace(forge, lambda: gen(forge, KOHYA["AB"]), before)
    before = snapshot(forge, lambda: gen(forge, KOHYA["AB"]))
    assert_methods_match(forge, reference)
    assert_no_trace(forge, lambda: gen(forge, KOHYA["AB"]), before)


@pytest.mark.usefixtures("no_tracebacks")
def test_gguf_k_quant_online(forge: WebuiClient) -> None:
    """Q6_K: Forge applies LoRAs to K-quants online only (the next test); there the methods match it."""
    with checkpoint(forge, Q6_K), unet_storage(forge, ONLINE):
        assert_methods_match(forge, online_reference(forge))


def test_gguf_k_quant_with_merged_loras_is_refused_and_forge_fails_as_without(forge: WebuiClient) -> None:
    """Forge cannot merge a LoRA into K-quant weights (its merge raises, naming its "fp16 LoRA" option): Multi-LoRA
    refuses before (its pass would merge the LoRAs back at its end), says why, and Forge fails as it does without
    it, no traceback going through the extension. (uvicorn drops the connection of a request that raised: this one
    has a connection of its own.)"""
    with checkpoint(forge, Q6_K):
        mark = forge.log_mark()
        payload = {**DEFAULT_TXT2IMG, **FLUX, "prompt": KOHYA["AB"], **multilora("Composite")}
        response = forge.request("POST", "/sdapi/v1/txt2img", json=payload, headers={"Connection": "close"})
        assert response.status_code == 500 and "Low bit LoRA for this data type" in response.text, response.text
        deadline = time.monotonic() + 30  # the server logs the report after answering
        while "NotImplementedError" not in forge.log_text(mark) and time.monotonic() < deadline:
            time.sleep(0.5)
        log = forge.log_text(mark)
        assert "Multi-LoRA: Forge merges no LoRA into Q6_K GGUF weights" in log, log
        found = tracebacks(log)
        assert found and all("lib_multilora" not in t for t in found), found


@pytest.mark.usefixtures("no_tracebacks")
def test_fp8_online_and_merged(forge: WebuiClient) -> None:
    """The dev checkpoint stored as fp8: online, the methods match Forge's online generation and a LoHa is refused;
    merged (rounded into the fp8 weights), they still match it, and nothing of the pass is left."""
    with checkpoint(forge, FLUX_NAME), unet_storage(forge, "float8-e4m3fn (fp16 LoRA)"):
        mark = forge.log_mark()
        reference = online_reference(forge)
        assert "'storage_dtype': torch.float8_e4m3fn" in forge.log_text(mark)
        assert_methods_match(forge, reference)
        assert_loha_refused(forge, "with LoRAs applied online")
        with unet_storage(forge, "float8-e4m3fn"):
            before = snapshot(forge, lambda: gen(forge, KOHYA["AB"]))
            assert_methods_match(forge, reference)
            assert_no_trace(forge, lambda: gen(forge, KOHYA["AB"]), before)
