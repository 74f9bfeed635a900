"""What the Flux modules (test_flux.py, test_flux_quantized.py) share: Flux-dev's settings, the prompts of each LoRA
layout, and the generation and noise-floor helpers run with them (helpers.py's, for SD)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .helpers import PROMPT, reference_within_floor

if TYPE_CHECKING:
    import numpy as np
    from webui.server import Result, WebuiClient

STEPS = 4
#: Flux-dev as its users run it: CFG 1 (no uncond), distilled guidance, Euler on the Simple schedule.
FLUX: dict[str, Any] = {"steps": STEPS, "scheduler": "Simple", "cfg_scale": 1, "distilled_cfg_scale": 3.5}
CFG3 = {"cfg_scale": 3}


def prompts(a: str, b: str) -> dict[str, str]:
    """The prompts of two LoRAs: the first, it at one weight as two patch sets, both, both swapped, the first in the
    transformer alone (the second in the text encoders only: Forge's ``<lora:name:te:unet>``) and that swapped."""
    return {
        "A": f"{PROMPT} <lora:{a}:0.5>",
        "A twice": f"{PROMPT} <lora:{a}:0.3> <lora:{a}:0.2>",
        "AB": f"{PROMPT} <lora:{a}:0.5> <lora:{b}:0.5>",
        "BA": f"{PROMPT} <lora:{b}:0.5> <lora:{a}:0.5>",
        "A unet": f"{PROMPT} <lora:{a}:0.5> <lora:{b}:0.5:0>",
        "A unet swapped": f"{PROMPT} <lora:{b}:0.5:0> <lora:{a}:0.5>",
    }


#: Flux's two LoRA layouts' prompts (kohya's and diffusers'), Chroma's and SD3.5's.
LAYOUTS = {"kohya": prompts("mfA", "mfB"), "diffusers": prompts("mfdA", "mfdB")}
CHROMA = prompts("mcA", "mcB")
SD35 = prompts("msA", "msB")
KOHYA = LAYOUTS["kohya"]
LAYOUT_IDS = list(LAYOUTS)


def gen(forge: WebuiClient, prompt: str, **extra: Any) -> Result:
    """A 64x64 txt2img as Flux-dev runs (:data:`FLUX`, seed 1234)."""
    return forge.txt2img(prompt=prompt, **{**FLUX, **extra})


def within_floor(forge: WebuiClient, one: str, other: str, **extra: Any) -> np.ndarray:
    """``helpers.reference_within_floor`` as Flux-dev runs: ``one``'s image, ``other`` within the noise floor of it."""
    return reference_within_floor(forge, one, other, **{**FLUX, **extra})
