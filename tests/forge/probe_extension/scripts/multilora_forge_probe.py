"""Test-only Forge extension: what the HTTP API cannot show of Forge's model state and of a Multi-LoRA pass.

Linked into the Forge tier's data dir (never shipped), on Forge or reForge (the older Forge backend on
``ldm_patched``); where they differ is in one section below ("the hosts' differences"). Endpoints:
- ``GET /multilora-probe/status``: ``{model_loaded, checkpoint, model_type}`` (Forge loads the model on the first
  generation; ``model_type``: the class of the webui's model object, e.g. Forge's ``Flux``).
- ``GET /multilora-probe/trace``: every Multi-LoRA inner-model call of the last generation: step, active LoRA
  indices, the LoRA files whose patches the pass's UNet patcher holds during the call (the composed ones are taken
  out of it when one of them is not a plain LoRA) and, for Composite, how far the output is from the (weighted)
  mean of freshly recomputed single-LoRA outputs (``diff_vs_mean``) and how far apart the first and last of those
  are (``spread``).
- ``GET /multilora-probe/fingerprint``: a checksum of every UNet and text-encoder parameter, the forward-hook count
  on them, the LoRA patches (file, strengths, online mode, patched keys) of the current UNet and CLIP patchers and of
  the ones the next generation starts from, which hash Forge's loaders have merged, whether a model function wrapper
  is set or held by a loaded model, the loaded networks: equal before and after a generation means no trace.
- ``POST /multilora-probe/model-flags {"is_sd1": bool, ...}``: set the loaded model's architecture flags, answer the
  previous ones (to present a model type the extension does not cover, and put it back).
- ``POST /multilora-probe/unet-storage {"option": "float8-e4m3fn (fp16 LoRA)"}``: Forge's "Diffusion in Low Bits"
  setting, applied as its UI applies it (``refresh_model_loading_parameters``): the next generation reloads the model
  with that storage (and, for the "fp16 LoRA" options, online LoRAs). Answers the previous option. Not on reForge
  (404), which has no such setting.
- ``POST /multilora-probe/recompute {"enabled": false}``: the trace stops recomputing Composite and Spatial calls
  (``diff_vs_mean``...: UNet calls of their own, whose state an extension like SAG would keep); answers the previous
  setting.
- ``POST /multilora-probe/controlnet-refresh``: the built-in ControlNet reads its model folders again (its panel's
  refresh button), for a model written after startup; answers ``{model_list}``.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from fastapi import Body
from modules import script_callbacks, scripts, sd_models, shared

LAST: dict[str, Any] = {"calls": []}
#: Whether the trace recomputes each Composite/Spatial call (``mix_checks``). Those recomputes are UNet calls of their
#: own: an extension that keeps a call's state for later (SAG's attention map) would then keep theirs.
RECOMPUTE = {"enabled": True}
MIX_CHECKS = Path(__file__).resolve().parents[3] / "webui" / "probe_extension" / "lib" / "mix_checks.py"


def _mix_checks() -> Any:
    """tests/webui/probe_extension/lib/mix_checks.py, loaded by its path (shared by both tiers' trace probes)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("multilora_mix_checks", MIX_CHECKS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.mix_checks


mix_checks = _mix_checks()
MODEL_FLAGS = ("is_sd1", "is_sd2", "is_sdxl", "is_sd3")


# --- the hosts' differences: Forge keeps each LoRA file's patches apart (``patcher.lora_patches``, keyed by file and
# strengths) and merges them with a loader per model (``lora_loader.loaded_hash``); reForge (ComfyUI's patcher) keeps
# one list per weight (``patcher.patches[key]``: (strength, adapter, strength_model, offset, function) tuples), no file
# names, and merges when a patcher's ``patches_uuid`` differs from the model's ``current_weight_patches_uuid``.

REFORGE = importlib.util.find_spec("ldm_patched") is not None


def patch_sets(patcher: Any) -> list[list[Any]]:
    """A patcher's LoRA patch sets as ``[file stem, strength_patch, strength_model, online_mode, patched keys]``, in
    load order (reForge: ``online_mode`` None; patches of no file of the current LoRA set as ``"(other)"``)."""
    if not REFORGE:
        return [
            [Path(filename).stem, strength, strength_model, online, len(patches)]
            for (filename, strength, strength_model, online), patches in patcher.lora_patches.items()
        ]
    files = reforge_files(patcher)
    sets: dict[int, list[Any]] = {}  # per file index (-1: none), [stem, strength, strength_model, None, keys]
    for key, entries in patcher.patches.items():
        for entry in entries:
            index = next((i for i, (_, adapters) in enumerate(files) if id(entry[1]) in adapters), -1)
            stem = Path(files[index][0]).stem if index >= 0 else "(other)"
            found = sets.setdefault(index, [stem, entry[0], entry[2], None, set()])
            found[4].add(key)
    return [[*found[:4], len(found[4])] for _, found in sorted(sets.items(), key=lambda item: (item[0] < 0, item[0]))]


def reforge_files(patcher: Any) -> list[tuple[str, set[int]]]:
    """reForge: each file of the current LoRA set (``current_lora_hash``: ``[[file, unet, te], ...]``) and the ids of
    the adapters its load added to ``patcher``'s kind (UNet or CLIP). Its ``networks.load_networks`` clones the
    original patcher once per file (none for a file at 0 for both) and adds that file's patches to the clone: the
    ``.parent`` chain from ``forge_objects_after_applying_lora``'s patcher back to ``forge_objects_original``'s."""
    model = shared.sd_model
    is_unet = patcher.model is model.forge_objects_original.unet.model

    def of(objects: Any) -> Any:
        return objects.unet if is_unet else objects.clip.patcher

    try:
        files = [f for f in ast.literal_eval(model.current_lora_hash or "[]") if f[1] or f[2]]
    except (ValueError, SyntaxError):
        files = []
    chain, node, stop = [], of(model.forge_objects_after_applying_lora), of(model.forge_objects_original)
    while node is not None and node is not stop:
        chain.append(node)
        node = node.parent
    chain.reverse()

    def adapters(node: Any) -> set[int]:
        return {id(entry[1]) for entries in node.patches.values() for entry in entries}

    found, before = [], adapters(stop)
    for i, node in enumerate(chain):
        now = adapters(node)
        found.append((files[i][0] if i < len(files) else "?", now - before))
        before = now
    return found


def merged(roots: dict[str, torch.nn.Module]) -> list[Any]:
    """What each model's weights have merged: Forge's loader hash; on reForge, whose patcher's patches (by role:
    the current ``forge_objects``' one, the next generation's, the original without LoRAs; ``"none"``, or
    ``"other"`` for any other patcher, e.g. a pass's clone). reForge gives a patcher a new ``patches_uuid`` each time
    it applies the LoRAs, so the uuid itself changes with every change of prompt."""
    if not REFORGE:
        return [root.lora_loader.loaded_hash for root in roots.values()]
    model = shared.sd_model
    sets = (("current", model.forge_objects), ("next", model.forge_objects_after_applying_lora))
    sets += (("original", model.forge_objects_original),)
    roles = []
    for part, root in roots.items():
        uuid = getattr(root, "current_weight_patches_uuid", None)
        patchers = [(role, objects.unet if part == "unet" else objects.clip.patcher) for role, objects in sets]
        found = [role for role, patcher in patchers if uuid is not None and patcher.patches_uuid == uuid]
        roles.append("+".join(found) or ("none" if uuid is None else "other"))
    return roles


def wrappers(patcher: Any) -> int:
    """Model function wrappers on a patcher: ``model_function_wrapper`` (and on reForge, ComfyUI's ``wrappers``)."""
    count = int("model_function_wrapper" in getattr(patcher, "model_options", {}))
    if REFORGE:
        count += sum(len(w) for kind in getattr(patcher, "wrappers", {}).values() for w in kind.values())
    return count


def loaded_models() -> list[Any]:
    """The patchers the memory manager holds loaded."""
    if REFORGE:
        from ldm_patched.modules import model_management
    else:
        from backend import memory_management as model_management
    return [loaded.model for loaded in model_management.current_loaded_models if loaded.model is not None]


# --- end of the hosts' differences ---


# --- the tier's one test-only patch of the host (Forge only): Flux's dimensions read from the file ---
# Forge's model detection (huggingface_guess's ``detect_unet_config``) takes any file with Flux's keys for FLUX.1 at
# its full size: hidden 3072, 24 heads, 19 double and 38 single blocks, whatever the file holds (only the guidance
# embedding is read from it). A test model small enough for a CPU cannot load then, and nothing else can make it:
# this reads those dimensions from the weights, as reForge's and ComfyUI's detection count the blocks. For a real
# FLUX.1 file it returns what the original does (its rotary split [16, 56, 56] is the rule below at head width 128),
# and every other model type goes to the original untouched. Everything after it (the loader, the patchers, the LoRA
# key maps, sampling) is Forge's own.


def count_blocks(state_dict: dict[str, Any], prefix: str) -> int:
    """How many numbered blocks ``prefix{i}.`` the state dict holds."""
    count = 0
    while any(key.startswith(f"{prefix}{count}.") for key in state_dict):
        count += 1
    return count


def flux_dimensions(state_dict: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Flux's transformer dimensions as the weights give them (the rotary split: 16 for the first axis, the rest of
    the head width halved between the two spatial axes, FLUX.1's [16, 56, 56] at 128)."""
    hidden, patches = state_dict[f"{prefix}img_in.weight"].shape
    head = state_dict[f"{prefix}double_blocks.0.img_attn.norm.query_norm.scale"].shape[0]
    return {
        "in_channels": patches // 4,
        "vec_in_dim": state_dict[f"{prefix}vector_in.in_layer.weight"].shape[1],
        "context_in_dim": state_dict[f"{prefix}txt_in.weight"].shape[1],
        "hidden_size": hidden,
        "mlp_ratio": state_dict[f"{prefix}double_blocks.0.img_mlp.0.weight"].shape[0] / hidden,
        "num_heads": hidden // head,
        "depth": count_blocks(state_dict, f"{prefix}double_blocks."),
        "depth_single_blocks": count_blocks(state_dict, f"{prefix}single_blocks."),
        "axes_dim": [16, (head - 16) // 2, (head - 16) // 2],
    }


def patch_flux_detection() -> None:
    """Wrap ``huggingface_guess.detection.detect_unet_config`` (once): Flux files get :func:`flux_dimensions`."""
    from huggingface_guess import detection

    original = detection.detect_unet_config
    if getattr(original, "multilora_probe", False):
        return

    def detect_unet_config(state_dict: dict[str, Any], key_prefix: str) -> Any:
        config = original(state_dict, key_prefix)
        if config is not None and config.get("image_model") == "flux" and f"{key_prefix}img_in.weight" in state_dict:
            config.update(flux_dimensions(state_dict, key_prefix))
        return config

    detect_unet_config.multilora_probe = True
    detection.detect_unet_config = detect_unet_config


if not REFORGE:
    patch_flux_detection()


class MultiLoraTraceProbe(scripts.Script):
    def title(self) -> str:
        return "multilora forge trace probe"

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def process(self, p: Any, *args: Any) -> None:
        calls: list[dict[str, Any]] = []
        LAST["calls"] = calls

        def observer(step: int, active: list[int], call: tuple[tuple, dict], result: torch.Tensor) -> None:
            patched = [stem for stem, *_ in patch_sets(p.sd_model.forge_objects.unet)]
            entry: dict[str, Any] = {"step": step, "active": list(active), "patched": patched}
            if len(active) > 1 and RECOMPUTE["enabled"]:
                entry.update(mix_checks(p.multilora_pass.wrapper, active, call, result))
            calls.append(entry)

        p.multilora_observer = observer


def status() -> dict[str, Any]:
    model = sd_models.model_data.get_sd_model()
    loaded = getattr(model, "forge_objects", None) is not None
    return {
        "model_loaded": loaded,
        "checkpoint": getattr(getattr(model, "sd_checkpoint_info", None), "title", None) if loaded else None,
        "model_type": type(model).__name__ if loaded else None,
    }


def checksum(roots: dict[str, torch.nn.Module]) -> str:
    """sha256 over every parameter's name and bytes; the per-parameter digests are computed on two threads
    (hashlib releases the GIL), as the text encoder alone is half a gigabyte."""
    named = [(f"{label}.{name}", param) for label, root in roots.items() for name, param in root.named_parameters()]

    def digest(item: tuple[str, torch.Tensor]) -> bytes:
        name, param = item
        data = param.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data
        return name.encode() + hashlib.sha256(data).digest()

    with ThreadPoolExecutor(2) as pool:
        return hashlib.sha256(b"".join(pool.map(digest, named))).hexdigest()


def fingerprint() -> dict[str, Any]:
    import networks

    model = shared.sd_model
    now, nxt = model.forge_objects, model.forge_objects_after_applying_lora
    roots = {"unet": now.unet.model, "clip": now.clip.cond_stage_model}
    hooks = sum(
        len(module._forward_hooks) + len(module._forward_pre_hooks)
        for root in roots.values()
        for module in root.modules()
    )
    return {
        "weights": checksum(roots),
        "hooks": hooks,
        "unet_patches": patch_sets(now.unet),
        "clip_patches": patch_sets(now.clip.patcher),
        "next_unet_patches": patch_sets(nxt.unet),
        "next_clip_patches": patch_sets(nxt.clip.patcher),
        "unet_is_next": now.unet is nxt.unet,
        "clip_is_next": now.clip is nxt.clip,
        "merged": merged(roots),
        "wrapper": [wrappers(patcher) for patcher in (now.unet, nxt.unet)],
        "loaded_wrappers": sum(wrappers(patcher) for patcher in loaded_models()),
        "networks": [n.name for n in networks.loaded_networks],
        "lora_hash": model.current_lora_hash,
    }


def on_app_started(_demo: Any, app: Any) -> None:
    @app.get("/multilora-probe/status")
    def get_status() -> dict[str, Any]:
        return status()

    @app.get("/multilora-probe/trace")
    def trace() -> dict[str, Any]:
        return LAST

    @app.get("/multilora-probe/fingerprint")
    def get_fingerprint() -> dict[str, Any]:
        from modules.call_queue import queue_lock

        with queue_lock:  # never hash weights a generation is merging
            return fingerprint()

    @app.post("/multilora-probe/model-flags")
    def model_flags(body: dict[str, Any] = Body(...)) -> dict[str, bool]:  # noqa: B008 - FastAPI's idiom
        model = shared.sd_model
        previous = {flag: bool(getattr(model, flag, False)) for flag in MODEL_FLAGS}
        for flag, value in body.items():
            if flag in MODEL_FLAGS:
                setattr(model, flag, bool(value))
        return previous

    if not REFORGE:  # Forge's "Diffusion in Low Bits"; reForge has none (404)

        @app.post("/multilora-probe/unet-storage")
        def unet_storage(body: dict[str, Any] = Body(...)) -> dict[str, str]:  # noqa: B008 - FastAPI's idiom
            from modules.call_queue import queue_lock
            from modules_forge import main_entry

            with queue_lock:
                previous = shared.opts.forge_unet_storage_dtype
                shared.opts.set("forge_unet_storage_dtype", str(body["option"]))
                main_entry.refresh_model_loading_parameters()
            return {"option": previous}

    @app.post("/multilora-probe/recompute")
    def recompute(body: dict[str, Any] = Body(...)) -> dict[str, bool]:  # noqa: B008 - FastAPI's idiom
        previous = dict(RECOMPUTE)
        RECOMPUTE["enabled"] = bool(body["enabled"])
        return previous

    @app.post("/multilora-probe/controlnet-refresh")
    def controlnet_refresh() -> dict[str, list[str]]:
        """Forge's built-in ControlNet lists its model folders once, when it loads: list them again, as the refresh
        button of its panel does, and answer its model names."""
        import sys

        global_state = sys.modules["lib_controlnet.global_state"]
        global_state.update_controlnet_filenames()
        return {"model_list": global_state.get_all_controlnet_names()}


script_callbacks.on_app_started(on_app_started)
