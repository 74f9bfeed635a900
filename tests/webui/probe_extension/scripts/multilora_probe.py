"""Test-only webui extension: exposes the built-in Lora extension's state over HTTP for the real-webui test tier.

Loaded by the webui from a symlink in the test data dir's ``extensions/`` folder; never shipped.  The HTTP API has no
view of which networks are loaded or how many of a file's modules matched a model layer, and both are what the tests
need to check LoRA handling end to end.
"""

from __future__ import annotations

import sys
from typing import Any

from fastapi import Body, FastAPI
from modules import script_callbacks


def _networks() -> Any:
    """The built-in Lora extension's ``networks`` module (imported by its own script before any request arrives)."""
    module = sys.modules.get("networks")
    if module is None:
        import networks as module  # the builtin Lora dir is on sys.path inside the webui
    return module


def _is_te_layer(layer: str) -> bool:
    return not layer.startswith("diffusion_model")


def _describe(net: Any) -> dict[str, Any]:
    layers = list(net.modules)
    n_te = sum(1 for layer in layers if _is_te_layer(layer))
    return {
        "name": net.name,
        "te_multiplier": float(net.te_multiplier),
        "unet_multiplier": float(net.unet_multiplier),
        "dyn_dim": net.dyn_dim,
        "n_modules": len(layers),
        "n_unet_modules": len(layers) - n_te,
        "n_te_modules": n_te,
        "filename": getattr(net.network_on_disk, "filename", None),
    }


def _file_match_report(net: Any) -> dict[str, Any]:
    """Compare the modules in the network's file with the modules networks.load_network created from it.

    networks.load_network keeps its keys_failed_to_match to itself, so re-derive it: every file key's module prefix
    (the part before the first dot) either produced a network module (its network_key shares the prefix) or failed.
    """
    from safetensors import safe_open

    with safe_open(net.network_on_disk.filename, framework="pt") as fh:
        keys = list(fh.keys())
    prefixes = {key.partition(".")[0] for key in keys if not key.startswith("bundle_emb.")}
    matched = {module.network_key.partition(".")[0] for module in net.modules.values()}
    unmatched = sorted(prefixes - matched)
    return {
        "n_file_modules": len(prefixes),
        "n_unmatched_modules": len(unmatched),
        "unmatched_modules": unmatched,
        "n_keys_failed_to_match": sum(1 for key in keys if key.partition(".")[0] in unmatched),
    }


def _status() -> dict[str, Any]:
    from modules import sd_models

    model = sd_models.model_data.sd_model
    return {
        "model_loaded": model is not None and sd_models.model_data.was_loaded_at_least_once,
        "checkpoint": getattr(getattr(model, "sd_checkpoint_info", None), "title", None),
        "lora_loaded": "networks" in sys.modules,
    }


def register(_demo: Any, app: FastAPI) -> None:
    """Add the probe routes to the webui's FastAPI app."""

    @app.get("/multilora-probe/status")
    def status() -> dict[str, Any]:
        return _status()

    @app.get("/multilora-probe/networks")
    def loaded_networks() -> list[dict[str, Any]]:
        return [_describe(net) for net in _networks().loaded_networks]

    @app.get("/multilora-probe/errors")
    def network_errors() -> dict[str, int]:
        extra = getattr(_networks(), "extra_network_lora", None)
        return dict(getattr(extra, "errors", {}) or {})

    @app.post("/multilora-probe/load")
    def load(body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008 - FastAPI's idiom
        """Body: {"names": [...], "te_multipliers": [...]?, "unet_multipliers": [...]?}.

        A plain dict, not a pydantic model: script modules are not in sys.modules, so pydantic v1 could not resolve
        postponed annotations of a model class defined here.
        """
        from modules import shared
        from modules.call_queue import queue_lock

        networks = _networks()
        with queue_lock:  # never race a generation that is applying networks
            shared.sd_model  # noqa: B018 - make sure a model is loaded: load_network maps onto its layers
            try:
                names = [str(name) for name in body["names"]]
                networks.load_networks(names, body.get("te_multipliers"), body.get("unet_multipliers"))
                loaded = list(networks.loaded_networks)
                report = {
                    "loaded": [_describe(net) for net in loaded],
                    "files": {net.name: _file_match_report(net) for net in loaded},
                    "not_loaded": [name for name in names if name not in {net.name for net in loaded}],
                }
            finally:
                networks.load_networks([])
        return report


script_callbacks.on_app_started(register, name="multilora_probe")
