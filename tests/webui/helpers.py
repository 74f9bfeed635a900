"""What the tier's test modules share: the skip at import, the prompt and steps, a generation call, the script args.

Only the standard library and pytest at module level, like server.py: collecting the tier needs nothing else.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pytest

from .server import SKIP_REASON

if TYPE_CHECKING:
    from .server import Result, WebuiClient

TITLE = "Multi-LoRA Composition"
PROMPT = "a photo of a cat"
STEPS = 8


def require_tier() -> None:
    """At a test module's top: skip the whole module without ``SD_WEBUI_DIR`` (with the tier's one-line reason), or
    without numpy (the images are compared as arrays)."""
    if not os.environ.get("SD_WEBUI_DIR", "").strip():
        pytest.skip(SKIP_REASON, allow_module_level=True)
    pytest.importorskip("numpy")


def gen(webui: WebuiClient, prompt: str, **extra: Any) -> Result:
    """txt2img at the tier's defaults (64x64, seed 1234, cfg 7) and STEPS steps."""
    return webui.txt2img(prompt=prompt, steps=STEPS, **extra)


def ml(**named: Any) -> dict[str, Any]:
    """The extension switched on with these named args (the API's dict form)."""
    return {"alwayson_scripts": {TITLE: {"args": [{"enabled": True, **named}]}}}


def multilora(method: str, tau: int = 5, loras: str = "", enabled: bool = True) -> dict[str, Any]:
    """The positional form of the first args (enabled, method, tau, loras), as the panel sends them."""
    return {"alwayson_scripts": {TITLE: {"args": [enabled, method, tau, loras]}}}
