"""Test-only probe: records what Multi-LoRA ran at each denoiser call and fingerprints the model state.

Loaded by the real-webui tier only (linked into the test data dir's extensions). Endpoints:
- ``GET /multilora-probe/trace``: the calls of the last generation: step, active LoRA indices, the built-in's loaded
  networks during the call and, for Composite, how far the returned output is from the (weighted) mean of freshly
  recomputed single-LoRA outputs (``POST /multilora-probe/recompute {"enabled": false}`` turns that off).
- ``GET /multilora-probe/fingerprint``: a checksum of every UNet and text-encoder parameter, one of what the built-in
  records as merged into each layer (``network_current_names``: a mismatch would make it skip a needed re-merge), the
  number of forward hooks on them, and the built-in's loaded networks: equal before and after a generation means no
  trace was left.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from modules import script_callbacks, scripts, shared

LAST: dict[str, Any] = {"calls": []}
MIX_CHECKS = Path(__file__).resolve().parents[1] / "lib" / "mix_checks.py"


def _mix_checks() -> Any:
    """tests/webui/probe_extension/lib/mix_checks.py, loaded by its path (shared by both tiers' trace probes)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("multilora_mix_checks", MIX_CHECKS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_shared = _mix_checks()
mix_checks, starts_a_trace, RECOMPUTE = _shared.mix_checks, _shared.starts_a_trace, _shared.RECOMPUTE


class MultiLoraTraceProbe(scripts.Script):
    def title(self) -> str:
        return "multilora trace probe"

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def process(self, p: Any, *args: Any) -> None:
        if not starts_a_trace(p):
            return
        calls: list[dict[str, Any]] = []
        LAST["calls"] = calls

        def observer(step: int, active: list[int], call: tuple[tuple, dict], result: torch.Tensor) -> None:
            import networks

            loaded = [n.name for n in networks.loaded_networks]
            entry: dict[str, Any] = {"step": step, "active": list(active), "loaded": loaded}
            if len(active) > 1 and RECOMPUTE["enabled"]:
                entry.update(mix_checks(p.multilora_pass.wrapper, active, call, result))
            calls.append(entry)

        p.multilora_observer = observer


def fingerprint() -> dict[str, Any]:
    import networks

    model = shared.sd_model
    digest, merged = hashlib.sha256(), hashlib.sha256()
    hooks = 0
    for root in (model.model, model.cond_stage_model):
        for name, module in root.named_modules():
            hooks += len(module._forward_hooks) + len(module._forward_pre_hooks)
            current = getattr(module, "network_current_names", ())
            if current:  # what the built-in believes is merged into this layer; () and absent mean the same
                merged.update(f"{name}={current!r}".encode())
            for pname, param in module.named_parameters(recurse=False):
                digest.update(f"{name}.{pname}".encode())
                digest.update(param.detach().float().cpu().numpy().tobytes())
    return {
        "weights": digest.hexdigest(),
        "merged": merged.hexdigest(),
        "hooks": hooks,
        "networks": [[n.name, n.te_multiplier, n.unet_multiplier] for n in networks.loaded_networks],
        "inner_model": type(getattr(model, "model", None)).__name__,
    }


def on_app_started(_demo: Any, app: Any) -> None:
    @app.get("/multilora-probe/trace")
    def trace() -> dict[str, Any]:
        return LAST

    @app.post("/multilora-probe/foreign-linear-patch")
    def foreign_linear_patch(body: dict[str, Any]) -> dict[str, bool]:
        """Stand in for an extension (composable-lora, Regional Prompter latent) that replaces Linear.forward."""
        current = torch.nn.Linear.forward
        if body.get("on") and not hasattr(current, "multilora_probe_original"):

            def foreign_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
                return current(self, x)

            foreign_forward.multilora_probe_original = current
            torch.nn.Linear.forward = foreign_forward
        elif not body.get("on") and hasattr(current, "multilora_probe_original"):
            torch.nn.Linear.forward = current.multilora_probe_original
        return {"patched": hasattr(torch.nn.Linear.forward, "multilora_probe_original")}

    @app.get("/multilora-probe/fingerprint")
    def get_fingerprint() -> dict[str, Any]:
        return fingerprint()

    _shared.add_recompute_route(app)


script_callbacks.on_app_started(on_app_started)
