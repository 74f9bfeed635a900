"""Test-only probe: a random ControlNet for the tier's tiny SD1 model, built by Mikubill's sd-webui-controlnet's own
model class and loaded by its own loader, for tests/webui/test_neighbours.py. Does nothing where that extension is
not installed.

Endpoints:
- ``POST /multilora-probe/controlnet-model {"name": str, "seed": int, "scale": float}``: writes
  ``<name>.safetensors`` into the extension's models folder and refreshes its model list; answers the config.
- ``POST /multilora-probe/controlnet-runs``: from now on, counts the runs of every ControlNet the extension holds
  loaded (a forward hook on the network inside each of its control models, which the control model's forward calls);
  ``GET``: ``{"runs": n, "wrapped": k}``, with ``k`` the loaded control models with a ``forward`` of their own
  (something left in place of theirs).

The extension (56cec5b2) builds every SD1 ControlNet it loads with SD1.5's config (``controlnet_model_guess``'s
``controlnet_default_config``: 320 channels, 8 heads; a yaml beside the model is ignored), whose 13 control outputs
could not be added to the tiny UNet's 32- to 128-channel blocks. This probe sets that config's channels and heads to
the loaded UNet's, in this test server only; the tiny UNet keeps SD1's block layout (4 levels, attention on the first
3, 12 input blocks and a middle block), so the default config's other entries and its 13 outputs fit it as they fit
SD1.5. The weights are drawn at random, the zero convolutions included (a fresh ControlNet's are zero and would
change nothing), ``scale`` times a fan-in-scaled normal there.
"""

from __future__ import annotations

import copy
import os
import sys
import zlib
from typing import Any

import torch
from fastapi import Body
from modules import script_callbacks, shared

#: The parameters of the ControlNet's outputs (its zero convolutions), which decide how strongly it steers the UNet.
OUTPUT_LAYERS = ("zero_convs.", "middle_block_out.")


def controlnet_module(attribute: str) -> Any:
    """The loaded module of sd-webui-controlnet that defines ``attribute`` (its scripts import each other as
    ``scripts.<name>``, which the webui's script loader resolves per extension)."""
    for module in list(sys.modules.values()):
        if attribute in getattr(module, "__dict__", {}) and "controlnet" in str(getattr(module, "__file__", "")):
            return module
    raise RuntimeError(f"sd-webui-controlnet is not loaded (no module defines {attribute})")


def tiny_config(guess: Any, unet: torch.nn.Module) -> dict[str, Any]:
    """The extension's SD1 config (module ``guess``), made the loaded UNet's size (in place: its loader reads it),
    with the hint and context sizes its loader reads from a state dict."""
    config = guess.controlnet_default_config
    config.update(model_channels=unet.model_channels, num_heads=unet.num_heads)
    context_dim = next(m.to_k.in_features for name, m in unet.named_modules() if name.endswith("attn2"))
    return {**copy.deepcopy(config), "hint_channels": 3, "context_dim": context_dim, "use_fp16": False}


def random_state_dict(model: torch.nn.Module, seed: int, scale: float) -> dict[str, torch.Tensor]:
    """Every parameter drawn from a per-name seeded normal: weights fan-in scaled (``scale`` times that for the
    outputs), norm weights around 1, biases small."""
    out = {}
    for name, tensor in model.state_dict().items():
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 7919 + seed)
        noise = torch.randn(tensor.shape, generator=generator)
        if tensor.dim() > 1:
            std = tensor[0].numel() ** -0.5 * (scale if name.startswith(OUTPUT_LAYERS) else 1.0)
            out[name] = noise * std
        elif name.endswith("weight"):
            out[name] = 1 + 0.1 * noise
        else:
            out[name] = 0.02 * noise
    return out


RUNS = {"runs": 0}


def loaded_control_models() -> list[torch.nn.Module]:
    """The control models the extension keeps loaded: its script class's model cache (of ``ControlModel`` tuples;
    a generation's unit gets the cached model or a shallow copy of it, which shares its networks)."""
    from modules import scripts

    script = next(s for s in scripts.scripts_txt2img.alwayson_scripts if s.title() == "ControlNet")
    return [cached.model for cached in type(script).model_cache.values()]


def count_run(*_: Any) -> None:
    RUNS["runs"] += 1


def on_app_started(_demo: Any, app: Any) -> None:
    @app.post("/multilora-probe/controlnet-runs")
    def start_counting() -> dict[str, int]:
        for model in loaded_control_models():
            network = model.control_model
            if not any(hook is count_run for hook in network._forward_hooks.values()):
                network.register_forward_hook(count_run)
        RUNS["runs"] = 0
        return RUNS

    @app.get("/multilora-probe/controlnet-runs")
    def runs() -> dict[str, int]:
        wrapped = sum("forward" in vars(model) for model in loaded_control_models())
        return {**RUNS, "wrapped": wrapped}

    @app.post("/multilora-probe/controlnet-model")
    def controlnet_model(body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008 - FastAPI's idiom
        from modules.call_queue import queue_lock
        from safetensors.torch import save_file

        with queue_lock:
            guess = controlnet_module("controlnet_default_config")
            config = tiny_config(guess, shared.sd_model.model.diffusion_model)
            network = guess.PlugableControlModel(config)
            weights = random_state_dict(network.control_model, int(body.get("seed", 0)), float(body["scale"]))
            state = controlnet_module("update_cn_models")
            os.makedirs(state.cn_models_dir, exist_ok=True)
            path = os.path.join(state.cn_models_dir, f"{body['name']}.safetensors")
            save_file({k: v.contiguous() for k, v in weights.items()}, path)
            state.update_cn_models()
        return {"path": path, "config": {k: v for k, v in config.items() if isinstance(v, (int, float, list))}}


script_callbacks.on_app_started(on_app_started)
