"""Test-only probe: puts the real webui into states this CPU machine cannot reach by itself.

Endpoints:
- ``POST /multilora-probe/manual-cast {"on": bool}``: from now on ``devices.autocast()`` returns the webui's own
  ``devices.manual_cast(devices.dtype)``, as it does for fp8 weights with fp32 inference, GTX 16xx, MPS and XPU: the
  layer classes' ``forward`` are the webui's cast wrappers during every generation (here casting to fp32: a no-op).
- ``POST /multilora-probe/model-flags {"is_sd1": bool, ...}``: sets the loaded model's architecture flags (the ones
  ``sd_models.set_model_type`` sets) and answers the previous ones, so that a test can present a model the extension
  does not cover and put the flags back.
"""

from __future__ import annotations

from typing import Any

from fastapi import Body
from modules import devices, script_callbacks, shared

MODEL_FLAGS = ("is_sd1", "is_sd2", "is_sdxl", "is_ssd", "is_sd3")


def on_app_started(_demo: Any, app: Any) -> None:
    original_autocast = devices.autocast

    @app.post("/multilora-probe/manual-cast")
    def manual_cast(body: dict[str, Any] = Body(...)) -> dict[str, bool]:  # noqa: B008 - FastAPI's idiom
        if body.get("on"):
            devices.autocast = lambda disable=False: (
                original_autocast(True) if disable else devices.manual_cast(devices.dtype)
            )
        else:
            devices.autocast = original_autocast
        return {"manual_cast": devices.autocast is not original_autocast}

    @app.post("/multilora-probe/model-flags")
    def model_flags(body: dict[str, Any] = Body(...)) -> dict[str, bool]:  # noqa: B008 - FastAPI's idiom
        model = shared.sd_model
        previous = {flag: bool(getattr(model, flag, False)) for flag in MODEL_FLAGS}
        for flag, value in body.items():
            if flag in MODEL_FLAGS:
                setattr(model, flag, bool(value))
        return previous


script_callbacks.on_app_started(on_app_started)
