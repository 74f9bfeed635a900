"""What the Forge tier's tests share: prompts, the Multi-LoRA API args and the noise floor (the no-trace
snapshot is every tier's: tests/hosts/tier.py).

"The same image" is the A1111 tier's ``SAME`` (max pixel difference <= 2/255); a test that compares two different
computation paths first measures the noise floor (:func:`reference_within_floor`: one reference computed two
mathematically equal ways, within that tier's ``NOISE_FLOOR``, 1/255), so that SAME is not hiding a real difference.
LoRAs are used at weight 0.5, where that holds on the tiny random model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from webui.server import SAME, assert_noise_floor, max_diff, trace

from .server import REFORGE

if TYPE_CHECKING:
    import numpy as np
    from webui.server import Result, WebuiClient

TITLE = "Multi-LoRA Composition"
PROMPT = "a photo of a cat"
STEPS = 6
#: A mean pixel difference above this is "a different image".
DIFFERENT = 2
AB = f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5>"
ABC = f"{AB} <lora:mlC:0.5>"
#: B in the text encoder only (Forge's extra_networks_lora: ``<lora:name:te:unet>``, the unet weight defaulting
#: to the te one), so the UNet sees A alone.
A_UNET = f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5:0>"


def multilora(method: str, tau: int = 5, loras: str = "", enabled: bool = True) -> dict[str, Any]:
    """The positional ``alwayson_scripts`` args (panel order: enabled, method, tau, loras)."""
    return {"alwayson_scripts": {TITLE: {"args": [enabled, method, tau, loras]}}}


def ml(**named: Any) -> dict[str, Any]:
    """The named-dict form of the args, enabled."""
    return {"alwayson_scripts": {TITLE: {"args": [{"enabled": True, **named}]}}}


def multidiffusion(tile_batch: int = 4) -> dict[str, Any]:
    """The built-in MultiDiffusion on: 48x48 tiles overlapping by 16, ``tile_batch`` tiles per UNet call (reForge's
    panel has a SpotDiffusion shift method last, unused by this method: its default)."""
    args = [True, "MultiDiffusion", 48, 48, 16, tile_batch, *(("random",) if REFORGE else ())]
    return {"MultiDiffusion Integrated": {"args": args}}


def gen(forge: WebuiClient, prompt: str, **extra: Any) -> Result:
    """A 64x64 txt2img of STEPS Euler steps (seed 1234, cfg 7)."""
    return forge.txt2img(prompt=prompt, **{"steps": STEPS, **extra})


def reference_within_floor(forge: WebuiClient, one: str, other: str, **extra: Any) -> np.ndarray:
    """Make the reference ``one`` and the equal ``other`` (e.g. its LoRAs in another order), require them within the
    noise floor of each other and return ``one``'s image."""
    reference = gen(forge, one, **extra).image
    assert_noise_floor(reference, gen(forge, other, **extra).image)
    return reference


def assert_batched_is_sequential(
    forge: WebuiClient, run: Callable[..., Result], ab: str, ba: str, steps: int, **extra: Any
) -> None:
    """Batched Composite over the two LoRAs of ``ab`` makes the Sequential image (within SAME; the noise floor
    measured with the LoRAs swapped, ``ba``), each call the mean of the two, with no fallback to Sequential. ``run``:
    the module's generation (its steps, CFG...)."""
    sequential = run(forge, ab, **extra, **ml(method="Composite", execution="Sequential")).image
    batched = run(forge, ab, **extra, **ml(method="Composite", execution="Batched"))
    calls = trace(forge)
    assert len(calls) == steps and all(c["active"] == [0, 1] and c["diff_vs_mean"] <= 1e-4 for c in calls), calls
    assert "running Composite sequentially" not in batched.infotext
    assert_noise_floor(sequential, run(forge, ba, **extra, **ml(method="Composite", execution="Sequential")).image)
    assert max_diff(sequential, batched.image) <= SAME
