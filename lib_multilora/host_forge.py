"""Host glue for Stable Diffusion WebUI Forge (lllyasviel's, ``main`` of 2025-06): the only module that touches
Forge's internals.

Forge keeps LoRAs as patches of the UNet's patcher, ``p.sd_model.forge_objects.unet.lora_patches``: a dict keyed by
``(filename, strength_patch, strength_model, online_mode)``, each mapping a parameter key
(``diffusion_model.<ldm path>.weight``) to entries ``[strength, (type, factors), strength_model, offset, function]``
(``backend/patcher/base.py`` ``add_patches``). ``LoraLoader.refresh`` merges them into the weights in
``sampling_prepare``, after ``process_before_every_sampling``, whenever the set of patch keys changed
(``backend/patcher/lora.py``), and ``forge_objects`` is reset before every sampling pass. So a pass works on its own
clone of the UNet patcher: with a model function wrapper (``calc_cond_uncond_batch`` calls it with ``apply_model``
and applies CFG to what it returns) that runs :class:`MethodInner`; and, when a composed LoRA is not a plain LoRA,
without the composed LoRAs' patches, so that the refresh merges only the others and the hooks add each composed one's
delta as Forge's own ``merge_lora_to_weight`` computes it (a layer's weight and bias patches as one delta). Plain
LoRAs stay merged and the hooks subtract the other composed ones, as on A1111, unless the weights are fp8 (the merge
rounds the LoRAs into them: then they are taken out too). ``finish_pass`` puts the original patcher back, and its
weights if the pass changed them, and leaves the clone, which Forge's memory management keeps loaded until the next
generation, without our wrapper.

Forge computes a model call's ControlNet residuals once, before the wrapper (``c["control"]``), and its UNet pops
them off the lists as it adds them: each of the call's passes gets its own copy of the lists (``inner.fresh``), so
the passes share that one ControlNet run, which is exact, as the ControlNet's weights carry no LoRA.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import generation, neighbours
from .engine import Delta, DenseDelta, HookEngine, LowRankDelta, build_engine, is_linear
from .generation import Resolved, report_unscheduled, warn
from .inner import MethodInner, runs_batched
from .schedule import sampling_step
from .spatial import Spatial, chunk_cond_rows

SUPPORTED_MODEL_FLAGS = ("is_sd1", "is_sd2", "is_sdxl")
#: UNet storage dtypes that keep a merged plain LoRA exact enough for a hook to subtract it again. Forge merges into
#: fp8 weights too (rounding every LoRA into them): there the composed LoRAs are taken out for the pass, as on A1111.
FLOAT_STORAGE = (torch.float32, torch.float16, torch.bfloat16)
#: bitsandbytes and GGUF storage: the weights are quantized tensors, which neither Forge's merge arithmetic nor the
#: engine's dense deltas read as they are.
QUANTIZED_STORAGE = ("nf4", "fp4", "gguf")
#: Forge's "lora" patch factors: (up, down, alpha, mid, dora_scale).
PLAIN_LORA = "lora"


def forge_networks() -> Any:
    """Forge's built-in Lora extension's ``networks`` module (``extensions-builtin/sd_forge_lora``)."""
    import networks

    return networks


@dataclass
class Pass:
    """Everything one sampling pass changed, so that :func:`finish_pass` can put it back exactly."""

    engine: HookEngine
    wrapper: MethodInner
    sampler: Any
    model: Any  # p.sd_model
    patcher: Any  # the pass's clone of the UNet patcher
    original: Any  # the patcher it stands in for
    previous_wrapper: Callable[..., torch.Tensor] | None  # the model function wrapper the clone had before ours
    taken_out: bool  # the clone lacks the composed LoRAs' patches: the weights were merged without them
    names: list[str]


class ApplyModel(nn.Module):
    """What :class:`MethodInner` calls: the ``apply_model`` that Forge hands the model function wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self.apply_model: Callable[..., torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, **c: Any) -> torch.Tensor:
        return self.apply_model(x, t, **c)


def resolve(p: Any) -> Resolved | None:
    """The composed LoRAs among Forge's ``networks.loaded_networks``. Forge patches a LoRA once per distinct weight
    it is written with (the same weight twice is one patch), and a composed LoRA is all its patches: as Forge merges
    it."""
    return generation.resolve(p, list(forge_networks().loaded_networks))


def filename(net: Any) -> str:
    """The file a loaded LoRA came from: Forge keys its patch sets by it (``lora_patches`` key ``[0]``)."""
    return net.network_on_disk.filename


def patches_of(patcher: Any, filenames: set[str]) -> dict[tuple, dict[str, list]]:
    """The patcher's LoRA patch sets whose file is among ``filenames``."""
    return {key: patches for key, patches in patcher.lora_patches.items() if key[0] in filenames}


def plan_pass(p: Any, resolved: Resolved) -> dict[nn.Module, dict[int, Delta]] | str:
    """The pass's per-layer deltas (:func:`collect_deltas`), or why the pass cannot be composed exactly: a model the
    engine does not cover, LoRAs Forge applies online (low-bit weights with an "fp16 LoRA" option: merged in every
    forward, not into the weights), quantized weights (bnb nf4/fp4, GGUF), composed LoRAs Forge loaded no patches
    for, layers the hooks have no op for, or another extension's work the pass cannot follow (:mod:`neighbours`)."""
    refusal = neighbours.refusal(p, resolved.args.method)
    if refusal:
        return refusal
    model = p.sd_model
    if not any(getattr(model, flag, False) for flag in SUPPORTED_MODEL_FLAGS):
        return f"{type(model).__name__} models are not supported (SD1, SD2 and SDXL are)"
    patcher = model.forge_objects.unet
    if any(key[3] for key in patcher.lora_patches):
        return "LoRAs applied online (Forge's fp16 LoRA option for low-bit weights) cannot be composed yet"
    storage = getattr(patcher.model, "storage_dtype", None)
    if storage in QUANTIZED_STORAGE:
        return f"UNet weights stored as {storage} cannot be composed yet"
    files = {filename(n) for n in resolved.composed}
    if not patches_of(patcher, files) and not patches_of(model.forge_objects.clip.patcher, files):
        return f"{', '.join(n.name for n in resolved.composed)}: Forge loaded no patches for them"
    deltas = collect_deltas(patcher, resolved.composed)
    foreign = sorted({type(module).__name__ for module in deltas if not applicable(module)})
    if foreign:
        return f"the composed LoRAs patch {', '.join(foreign)} layers, which the hooks cannot apply"
    return deltas


def apply_text_encoder_policy(p: Any) -> None:
    """Before conds are computed: the text encoder without the composed LoRAs the policy leaves out (a clone of the
    CLIP patcher without their patches for the conds; ``restore_text_encoder`` puts the original back and merges it
    again), and conds cached in lists of this generation's own."""
    if "multilora_muted_te" in vars(p):
        return
    resolved = resolve(p)
    if resolved is None or resolved.args.text_encoder == "All" or isinstance(plan_pass(p, resolved), str):
        return
    keep = resolved.composed[:1] if resolved.args.text_encoder == "First" else []
    muted_files = {filename(n) for n in resolved.composed if all(n is not k for k in keep)}
    objects = p.sd_model.forge_objects
    original = objects.clip
    muted = original.clone()
    muted.patcher.lora_patches = {
        key: patches for key, patches in original.patcher.lora_patches.items() if key[0] not in muted_files
    }
    objects.clip = muted
    p.multilora_muted_te = (objects, original, muted)
    p.cached_c, p.cached_uc = [None, None], [None, None]
    if hasattr(p, "cached_hr_c"):
        p.cached_hr_c, p.cached_hr_uc = [None, None], [None, None]


def restore_text_encoder(p: Any) -> None:
    """Put the original CLIP patcher back and merge its LoRAs into the text encoder again, as a plain generation
    leaves it."""
    state = vars(p).pop("multilora_muted_te", None)
    if state is None:
        return
    objects, original, muted = state
    if objects.clip is muted:
        objects.clip = original
    original.patcher.refresh_loras()


def start_pass(p: Any) -> None:
    """Install the chosen method for the sampling pass about to run (first pass or hires pass). Forge calls
    ``process_before_every_sampling`` twice for a hires pass, resetting ``forge_objects`` in between: the second
    install replaces the first."""
    finish_pass(p)
    restore_text_encoder(p)
    resolved = resolve(p)
    if resolved is None:
        return
    offset = generation.pass_offset(p, resolved)
    if offset is None:
        return
    planned = plan_pass(p, resolved)
    if isinstance(planned, str):
        warn(p, f"{planned}; running without Multi-LoRA")
        return
    deltas, original = planned, p.sd_model.forge_objects.unet
    untouched = [n.name for k, n in enumerate(resolved.composed) if not any(k in d for d in deltas.values())]
    if untouched:
        warn(p, f"{', '.join(untouched)} touch no UNet layer (text encoder only?)")
    keep_merged = getattr(original.model, "storage_dtype", None) in FLOAT_STORAGE and all(
        isinstance(d, LowRankDelta) for per_layer in deltas.values() for d in per_layer.values()
    )
    spatial = resolved.args.method == "Spatial"
    engine = build_engine(deltas, len(resolved.composed), keep_merged, webui_device().type == "cuda", base=spatial)
    install(p, resolved, engine, original, keep_merged, offset)


def webui_device() -> torch.device:
    """The device Forge runs the model on."""
    from modules import devices

    return devices.device


def collect_deltas(patcher: Any, composed: list[Any]) -> dict[nn.Module, dict[int, Delta]]:
    """Per UNet layer, each composed LoRA's delta (LoRA k = index k), from all of its patch sets: a layer's weight
    and bias patches make one delta (LyCORIS norm and full patch both)."""
    from backend.utils import get_attr_with_parent

    per_layer: dict[nn.Module, dict[int, dict[str, tuple[str, list]]]] = {}
    for k, net in enumerate(composed):
        for patches in patches_of(patcher, {filename(net)}).values():
            for key, entries in patches.items():
                module, attribute, _ = get_attr_with_parent(patcher.model, key)
                per_parameter = per_layer.setdefault(module, {}).setdefault(k, {})
                per_parameter.setdefault(attribute, (key, []))[1].extend(entries)
    return {
        module: {k: make_delta(module, per_parameter) for k, per_parameter in per_lora.items()}
        for module, per_lora in per_layer.items()
    }


def applicable(module: nn.Module) -> bool:
    """Whether the engine can apply a delta on this layer: the ops of :class:`DenseDelta` (Forge's ``Linear`` is no
    ``nn.Linear``, its convs and norms subclass torch's)."""
    return isinstance(module, (nn.Conv2d, nn.GroupNorm, nn.LayerNorm)) or is_linear(module)


def make_delta(module: nn.Module, per_parameter: dict[str, tuple[str, list]]) -> Delta:
    """The low-rank path when the layer's weight alone is patched, by plain LoRAs that simply add up; else the
    delta Forge's own ``merge_lora_to_weight`` makes of each patched parameter (``{attribute: (key, entries)}``),
    computed on the parameters the layer runs with in this pass."""
    if set(per_parameter) == {"weight"}:
        low_rank = [plain_low_rank(entry, module.weight) for entry in per_parameter["weight"][1]]
        if all(d is not None for d in low_rank):
            return LowRankDelta.concat(low_rank)
    from backend.patcher.lora import merge_lora_to_weight

    def compute(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        deltas = {}
        for attribute, (key, entries) in per_parameter.items():
            current = getattr(layer, attribute).detach().float()
            deltas[attribute] = merge_lora_to_weight(entries, current, key, computation_dtype=torch.float32) - current
        weight = deltas.get("weight")
        return torch.zeros_like(layer.weight, dtype=torch.float32) if weight is None else weight, deltas.get("bias")

    return DenseDelta(compute)


def plain_low_rank(entry: list, weight: torch.Tensor) -> LowRankDelta | None:
    """``strength * alpha / rank * up @ down`` as factors in the layer's own layout, for a ``"lora"`` entry on a
    linear or conv2d weight with no mid (CP), no DoRA, no weight scaling, slice or function; None for anything
    else."""
    strength, patch, strength_model, offset, function = entry
    if not (isinstance(patch, tuple) and len(patch) == 2 and patch[0] == PLAIN_LORA):
        return None
    up, down, alpha, mid, dora_scale = patch[1]
    if mid is not None or dora_scale is not None or strength_model != 1.0 or offset is not None or function:
        return None
    if weight.dim() not in (2, 4):  # the low-rank path is a linear or a conv2d
        return None
    rank = down.shape[0]
    if (
        up.shape[0] != weight.shape[0]
        or down.numel() != rank * weight[0].numel()
        or up.numel() != weight.shape[0] * rank
    ):
        return None
    if weight.dim() == 4:
        down, up = down.reshape(rank, *weight.shape[1:]), up.reshape(weight.shape[0], rank, 1, 1)
    else:
        down, up = down.flatten(1), up.flatten(1)
    scale = strength * (alpha / rank if alpha is not None else 1.0)
    return LowRankDelta(down.detach(), up.detach(), float(scale))


def install(p: Any, resolved: Resolved, engine: HookEngine, original: Any, keep_merged: bool, step_offset: int) -> None:
    args, composed = resolved.args, resolved.composed
    patcher = original.clone()
    if not keep_merged:
        files = {filename(n) for n in composed}
        patcher.lora_patches = {key: v for key, v in original.lora_patches.items() if key[0] not in files}
    weights = generation.pass_weights(p, args, len(composed))
    denoiser = p.sampler.model_wrap_cfg
    inner = ApplyModel()
    cond_rows: list[torch.Tensor | None] = [None]  # the cond rows of the call about to reach the wrapper
    spatial = None
    if args.method == "Spatial":  # Forge's apply_model returns denoised predictions of (input, timestep = sigma)
        spatial = Spatial(args.patch, args.temperature, lambda rows: rows_if(cond_rows[0], rows))
    wrapper = MethodInner(
        inner,
        engine,
        args.method,
        len(composed),
        args.tau,
        step=lambda: step_offset + sampling_step(denoiser.step, denoiser.total_steps, denoiser.steps),
        observer=getattr(p, "multilora_observer", None),  # set by the test probe
        batched=runs_batched(args.execution, webui_device()),
        warn=lambda message: warn(p, message),
        weights=weights,
        window=args.window,
        steps=lambda: step_offset + (denoiser.steps or 0),
        merged=generation.merged_groups(len(composed), keep_merged),
        spatial=spatial,
        conflict=batch_conflict,
    )
    previous = original.model_options.get("model_function_wrapper")

    def unet_function(apply_model: Callable[..., torch.Tensor], call: dict[str, Any]) -> torch.Tensor:
        """Forge's model function wrapper: the method around each UNet call, inside any wrapper set before."""
        inner.apply_model = apply_model
        own = chunk_cond_rows(call.get("cond_or_uncond") or [], call["input"].shape[0])
        if previous is None:
            cond_rows[0] = own
            return wrapper(call["input"], call["timestep"], **call["c"])

        def wrapped(x: torch.Tensor, t: torch.Tensor, **c: Any) -> torch.Tensor:
            cond_rows[0] = stacked_cond_rows(own, call["c"], c, x.shape[0])
            return wrapper(x, t, **c)

        return previous(wrapped, call)

    patcher.set_model_unet_function_wrapper(unet_function)
    names = [n.name for n in composed]
    p.multilora_pass = Pass(engine, wrapper, p.sampler, p.sd_model, patcher, original, previous, not keep_merged, names)
    p.extra_generation_params.update(args.infotext(names))
    p.sd_model.forge_objects.unet = patcher
    engine.install()
    generation.finish_with_sampler(p, p.sampler, finish_pass)


def rows_if(cond_rows: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """``cond_rows`` if it is one per row of a call of ``rows`` rows, else None (not known)."""
    return cond_rows if cond_rows is not None and cond_rows.shape[0] == rows else None


def stacked_cond_rows(own: torch.Tensor | None, call_c: dict[str, Any], c: dict[str, Any], rows: int) -> Any:
    """The cond rows of a call that a model function wrapper set before ours makes of the UNet call: Forge's
    MultiDiffusion stacks tiles of the latent, each with all of the call's rows in the call's order (its conds
    repeated per tile), so a call of k tiles has the call's cond rows k times over. Only where the call's
    cross-attention conds confirm that layout; None (not known) otherwise."""
    context, tiled = call_c.get("c_crossattn"), c.get("c_crossattn")
    if own is None or rows % own.shape[0] or not isinstance(context, torch.Tensor) or context.shape[0] != own.shape[0]:
        return None
    k = rows // own.shape[0]
    if not isinstance(tiled, torch.Tensor) or not torch.equal(tiled, context.repeat(k, *[1] * (context.dim() - 1))):
        return None
    return own.repeat(k)


def unet_patches(options: dict[str, Any]) -> list[tuple[str, Any]]:
    """(kind, callable) for everything in a call's ``transformer_options`` that Forge's UNet hands the call's rows to
    besides its own layers (``backend/nn/unet.py``): other extensions' patches (``"attn1 patch"``, ``"output block
    patch"``...), attention replacements, block modifiers and the group-norm wrapper."""
    found = [(kind.replace("_", " "), fn) for kind, fns in (options.get("patches") or {}).items() for fn in fns]
    for attention, per_block in (options.get("patches_replace") or {}).items():
        found += [(f"{attention} replacement", fn) for fn in per_block.values()]
    for kind in ("block_modifiers", "block_inner_modifiers"):
        found += [(kind[:-1].replace("_", " "), fn) for fn in options.get(kind) or []]
    if options.get("group_norm_wrapper") is not None:
        found.append(("group norm wrapper", options["group_norm_wrapper"]))
    return found


def owner(fn: Any) -> str:
    """The extension a patch comes from (its folder under ``extensions``/``extensions-builtin``), or its module."""
    fn = getattr(fn, "func", fn)  # functools.partial
    try:
        path = Path(inspect.getfile(fn if inspect.isroutine(fn) else type(fn).__call__))
    except TypeError:  # a builtin
        path = Path()
    for folder in ("extensions-builtin", "extensions"):
        if folder in path.parts[:-1]:
            return path.parts[path.parts.index(folder) + 1]
    return getattr(fn, "__module__", None) or type(fn).__name__


def batch_conflict(kwargs: dict[str, Any]) -> str | None:
    """Why this UNet call's batch may not be replicated per LoRA: other extensions' patches inside the UNet see the
    call's rows as one batch (StyleAlign shares attention across them, SAG records one call's attention and slices
    it by the call's cond/uncond layout, IP-Adapter and reference indexes rows by it), so only a plain UNet
    is batched; None when the call carries no patch."""
    patches = unet_patches(kwargs.get("transformer_options") or {})
    if not patches:
        return None
    by_owner: dict[str, set[str]] = {}
    for kind, fn in patches:
        by_owner.setdefault(owner(fn), set()).add(kind)
    named = "; ".join(f"{name} ({', '.join(sorted(kinds))})" for name, kinds in sorted(by_owner.items()))
    return f"the UNet patches of {named}"


def finish_pass(p: Any) -> None:
    """Undo :func:`install`; safe to call any number of times, from any callback, after any failure."""
    state: Pass | None = vars(p).pop("multilora_pass", None)
    if state is None:
        return
    state.engine.remove()
    generation.unwrap_sampler(state.sampler)
    objects = state.model.forge_objects
    if objects.unet is state.patcher:
        objects.unet = state.original
    # Forge's memory management keeps the clone loaded until the next generation loads a patcher of its own: it must
    # not hold on to the pass (our wrapper's closure holds p, its sampler and the engine)
    if state.previous_wrapper is None:
        state.patcher.model_options.pop("model_function_wrapper", None)
    else:
        state.patcher.set_model_unet_function_wrapper(state.previous_wrapper)
    report_unscheduled(p, state.wrapper, state.names)
    if state.taken_out:  # merge every LoRA back into the weights, as a plain generation leaves them
        state.original.refresh_loras()
