"""The host glue, one module per webui, behind :class:`generation.Host`; the only code that touches webui internals.

- ``a1111``: AUTOMATIC1111 1.10 (its built-in Lora extension's ``networks``, A1111's CFG denoiser).
- ``forge``: Forge on its 2024 backend (``backend/``: LoRA patch sets keyed by file).
- ``reforge``: the Forge family's older backend (``ldm_patched``, ComfyUI's ModelPatcher): reForge.
``patcher`` is what the two Forge backends share: a pass on a clone of the UNet patcher with a model function
wrapper.
"""

from __future__ import annotations

import importlib.util
from typing import Any


def found(name: str) -> bool:
    """Whether a top-level module or package ``name`` can be imported."""
    return importlib.util.find_spec(name) is not None


def detect() -> Any:
    """The glue for the running webui, told apart by what its tree has (not by version strings, which forks keep
    changing), or why none fits."""
    if found("modules_forge"):
        if found("backend"):
            from .forge import ForgeHost

            return ForgeHost()
        if found("ldm_patched"):
            from .reforge import ReforgeHost

            return ReforgeHost()
        return "this Forge has neither backend/ (Forge) nor ldm_patched/ (reForge)"
    if found("modules") and found("networks"):
        from . import a1111

        return a1111
    return "this webui is neither AUTOMATIC1111 1.10 (with its built-in Lora extension), Forge nor reForge"
