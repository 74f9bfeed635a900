"""What both Forge backends share (Forge's ``backend/`` and reForge's ``ldm_patched``, both ComfyUI-style patchers):
LoRAs are patches of the UNet's patcher (``p.sd_model.forge_objects.unet``), merged into the weights when sampling
is prepared, and ``forge_objects`` is reset before every sampling pass. So a pass works on its own clone of the UNet
patcher: with a model function wrapper (the sampler calls it with ``apply_model`` and applies CFG to what it returns)
that runs :class:`MethodInner`; and, when a composed LoRA is not a plain LoRA, without the composed LoRAs' patches,
so that the merge takes in only the others and the hooks add each composed one's delta as the host's own merge
computes it (a layer's weight and bias patches as one delta). Plain LoRAs stay merged and the hooks subtract the
other composed ones, unless the weights are not float (fp8, GGUF: the merge rounds the LoRAs into them) or the LoRAs
are applied online: then they are taken out too, and on weights a delta cannot be computed from
(:meth:`PatcherHost.opaque_weights`) only plain LoRAs, whose hooks never read the weights, are composed.
``finish_pass`` puts the original patcher back, and its weights if the pass changed them, and leaves the clone, which
the memory management keeps loaded until the next generation, without our wrapper.

Both compute a model call's ControlNet residuals once, before the wrapper (``c["control"]``), and their UNets pop
them off the lists as they add them: each of the call's passes gets its own copy of the lists (``inner.fresh``), so
the passes share that one ControlNet run, which is exact, as the ControlNet's weights carry no LoRA.

:class:`PatcherHost` is that pass; a backend (``forge``, ``reforge``) answers where a LoRA's patches are, how a patch
reads as low-rank factors, how its merge computes a delta, and how to merge a patcher's LoRAs again.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import generation
from ..engine import Delta, DenseDelta, HookEngine, LowRank, LowRankDelta, is_linear, low_rank_sum
from ..generation import NOTHING_COVERED, Plan, Resolved, report_unscheduled
from ..inner import MethodInner
from ..spatial import Spatial, chunk_cond_rows

#: Patch entries of one parameter: the backend's own tuples ``(strength, patch, strength_model, offset, function)``.
Entries = list[Any]
#: One LoRA's patches of one layer: ``{attribute: (key, entries)}`` (its weight's, its bias's).
Patches = dict[str, tuple[str, Entries]]
#: UNet storage dtypes that keep a merged plain LoRA exact enough for a hook to subtract it again.
FLOAT_STORAGE = (torch.float32, torch.float16, torch.bfloat16)
#: The parameters of a layer that a delta can change (:class:`DenseDelta`'s ops).
LAYER_PARAMETERS = ("weight", "bias")
#: Columns of a LoRA's delta per block when checking that a patch entry's function is one of its rows (:func:`through`).
CHECK_COLUMNS = 64


@dataclass
class Pass:
    """Everything one sampling pass changed, so that :meth:`PatcherHost.finish_pass` can put it back exactly."""

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
    """What :class:`MethodInner` calls: the ``apply_model`` the sampler hands the model function wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self.apply_model: Callable[..., torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, **c: Any) -> torch.Tensor:
        return self.apply_model(x, t, **c)


class PatcherHost:
    """A Forge backend's pass (:class:`generation.Host`); subclasses answer the backend's own questions."""

    #: A LoRA written twice in the prompt: reForge patches it twice, Forge once per distinct weight.
    merges_each_mention: bool = False
    #: Model types besides SD1/SD2/SDXL whose LoRA patches this backend's pass covers (``generation.Host``).
    covered_models: Mapping[str, str] = NOTHING_COVERED

    # --- what each backend answers -------------------------------------------------------------------------------

    def backend_refusal(self, p: Any, patcher: Any) -> str | None:
        """Why this backend cannot compose on this UNet patcher (LoRAs applied online, quantized weights), if so."""
        raise NotImplementedError

    def entries(self, p: Any, patcher: Any, nets: list[Any]) -> dict[str, Entries]:
        """The patch entries of ``nets`` that ``patcher`` (the UNet's or the text encoder's) holds, per key."""
        raise NotImplementedError

    def strip(self, p: Any, patcher: Any, nets: list[Any]) -> None:
        """Remove the patches of ``nets`` from ``patcher`` (a clone of ours), so that its next merge leaves them out."""
        raise NotImplementedError

    def lora_factors(self, patch: Any) -> tuple[torch.Tensor, torch.Tensor, Any] | None:
        """``(up, down, alpha)`` of a plain LoRA patch (no mid, DoRA or reshape), None for anything else."""
        raise NotImplementedError

    def merged(self, entries: Entries, weight: torch.Tensor, key: str) -> torch.Tensor:
        """``weight`` (float32, a copy) with ``entries`` merged as the backend merges them."""
        raise NotImplementedError

    def storage_dtype(self, patcher: Any) -> Any:
        """How the UNet's weights are stored (a torch dtype, or the backend's name for a quantized format)."""
        raise NotImplementedError

    def remerge(self, patcher: Any) -> None:
        """Merge ``patcher``'s LoRAs into its model's weights now, as a plain generation leaves them."""
        raise NotImplementedError

    def opaque_weights(self, patcher: Any) -> str | None:
        """Why a delta computed from the UNet's weights (:class:`DenseDelta`: LyCORIS types, DoRA) would be wrong on
        this patcher, if so: weights stored in a format whose tensors are not their values, LoRAs that the weights do
        not hold. Plain low-rank deltas never read the weights."""
        return None

    # --- the pass -------------------------------------------------------------------------------------------------

    def loaded_networks(self) -> list[Any]:
        """The built-in Lora extension's ``networks.loaded_networks``."""
        import networks

        return list(networks.loaded_networks)

    def device(self) -> torch.device:
        """The device the webui runs the model on."""
        from modules import devices

        return devices.device

    def refusal(self, p: Any, resolved: Resolved) -> str | None:
        """Why the pass cannot be composed exactly, from the patches alone: the backend's refusals
        (:meth:`backend_refusal`), composed LoRAs it loaded no patches for, layers the hooks have no op for."""
        objects = p.sd_model.forge_objects
        patcher = objects.unet
        refusal = self.backend_refusal(p, patcher)
        if refusal:
            return refusal
        composed = resolved.composed
        entries = self.entries(p, patcher, composed)
        if not entries and not self.entries(p, objects.clip.patcher, composed):
            return f"{', '.join(map(generation.prompt_name, composed))}: the webui loaded no patches for them"
        others = sorted(key for key in entries if key.rsplit(".", 1)[1] not in LAYER_PARAMETERS)
        if others:  # a norm's scale (Flux's RMSNorm): the hooks apply deltas of a layer's weight and bias only
            more = f" and {len(others) - 2} more" if len(others) > 2 else ""
            return f"the composed LoRAs patch {', '.join(others[:2])}{more}, which the hooks cannot apply"
        layers = {patcher.model.get_submodule(key.rsplit(".", 1)[0]) for key in entries}
        foreign = sorted({type(module).__name__ for module in layers if not applicable(module)})
        if foreign:
            return f"the composed LoRAs patch {', '.join(foreign)} layers, which the hooks cannot apply"
        opaque = self.opaque_weights(patcher)
        if opaque:  # the hooks may only add deltas that never read the weights
            dense = sorted(
                {
                    k
                    for module, per_lora in self.layer_patches(p, patcher, composed).items()
                    for k, per_parameter in per_lora.items()
                    if self.low_rank(module, per_parameter) is None
                }
            )
            if dense:
                names = ", ".join(generation.prompt_name(composed[k]) for k in dense)
                return f"{names}: only plain LoRAs can be composed on UNet weights {opaque} (other types read them)"
        return None

    def plan(self, p: Any, resolved: Resolved) -> Plan:
        """The pass's per-layer deltas (:meth:`collect_deltas`), for a pass :meth:`refusal` lets through."""
        patcher = p.sd_model.forge_objects.unet
        deltas = self.collect_deltas(p, patcher, resolved.composed)
        return Plan(deltas, exact_merge=self.storage_dtype(patcher) in FLOAT_STORAGE)

    def layer_patches(self, p: Any, patcher: Any, composed: list[Any]) -> dict[nn.Module, dict[int, Patches]]:
        """Per UNet layer, each composed LoRA's patches of it (LoRA k = index k), per parameter."""
        per_layer: dict[nn.Module, dict[int, Patches]] = {}
        for k, net in enumerate(composed):
            for key, entries in self.entries(p, patcher, [net]).items():
                path, attribute = key.rsplit(".", 1)
                module = patcher.model.get_submodule(path)
                per_parameter = per_layer.setdefault(module, {}).setdefault(k, {})
                per_parameter.setdefault(attribute, (key, []))[1].extend(entries)
        return per_layer

    def collect_deltas(self, p: Any, patcher: Any, composed: list[Any]) -> dict[nn.Module, dict[int, Delta]]:
        """Per UNet layer, each composed LoRA's delta (LoRA k = index k), from all of its patches: a layer's weight
        and bias patches make one delta (LyCORIS norm and full patch both)."""
        return {
            module: {k: self.make_delta(module, per_parameter) for k, per_parameter in per_lora.items()}
            for module, per_lora in self.layer_patches(p, patcher, composed).items()
        }

    def low_rank(self, module: nn.Module, per_parameter: Patches) -> LowRank | None:
        """The low-rank delta of a layer whose weight alone is patched, by plain LoRAs that simply add up; None for
        any other patches."""
        if set(per_parameter) != {"weight"}:
            return None
        parts = [self.plain_low_rank(entry, module.weight) for entry in per_parameter["weight"][1]]
        return low_rank_sum(parts) if all(d is not None for d in parts) else None

    def make_delta(self, module: nn.Module, per_parameter: Patches) -> Delta:
        """The low-rank path (:meth:`low_rank`) where it applies; else the delta the backend's own merge makes of
        each patched parameter (``{attribute: (key, entries)}``), computed on the parameters the layer runs with in
        this pass."""
        low_rank = self.low_rank(module, per_parameter)
        if low_rank is not None:
            return low_rank

        def compute(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
            deltas = {}
            for attribute, (key, entries) in per_parameter.items():
                current = getattr(layer, attribute).detach().float()
                deltas[attribute] = self.merged(entries, current.clone(), key) - current
            weight = deltas.get("weight")
            return torch.zeros_like(layer.weight, dtype=torch.float32) if weight is None else weight, deltas.get("bias")

        return DenseDelta(compute)

    def plain_low_rank(self, entry: Any, weight: torch.Tensor) -> LowRankDelta | None:
        """``strength * alpha / rank * function(up @ down)`` as factors in the layer's own layout, for a plain LoRA
        entry on a linear or conv2d weight with no weight scaling (``strength_model``); on a slice of a Linear's
        output features (``offset``: diffusers-format Flux LoRAs on the fused ``qkv``/``linear1``) as a delta on that
        span; with a ``function`` that moves the delta's rows (``swap_scale_shift``), through its ``up``. None for
        anything else: the backend's merge then computes the delta (:class:`DenseDelta`)."""
        strength, patch, strength_model, offset, function = entry
        factors = self.lora_factors(patch)
        if factors is None or strength_model != 1.0 or weight.dim() not in (2, 4):  # linear or conv2d
            return None
        up, down, alpha = factors
        rows, span = weight.shape[0], None
        if offset is not None:  # (dim, start, length): the merge narrows the weight to it
            dim, start, length = offset
            if dim != 0 or weight.dim() != 2 or start < 0 or start + length > rows:
                return None
            rows, span = length, (start, start + length)
        rank = down.shape[0]
        if down.numel() != rank * weight[0].numel() or up.shape[0] != rows or up.numel() != rows * rank:
            return None
        if weight.dim() == 4:
            down, up = down.reshape(rank, *weight.shape[1:]), up.reshape(rows, rank, 1, 1)
        else:
            down, up = down.flatten(1), up.flatten(1)
        if function is not None:
            up = through(function, up.detach(), down.detach())
            if up is None:
                return None
        scale = strength * (float(alpha) / rank if alpha is not None else 1.0)
        return LowRankDelta(down.detach(), up.detach(), float(scale), span)

    def mute_text_encoder(self, p: Any, muted: list[Any]) -> tuple[Any, Any, Any]:
        """A clone of the CLIP patcher without the muted LoRAs' patches, for the conds (the webui merges the text
        encoder's patcher before encoding)."""
        objects = p.sd_model.forge_objects
        original = objects.clip
        clone = original.clone()
        self.strip(p, clone.patcher, muted)
        objects.clip = clone
        return objects, original, clone

    def unmute_text_encoder(self, p: Any, state: tuple[Any, Any, Any]) -> None:
        """Put the original CLIP patcher back and merge its LoRAs into the text encoder again."""
        objects, original, clone = state
        if objects.clip is clone:
            objects.clip = original
        self.remerge(original.patcher)

    def install(self, p: Any, resolved: Resolved, engine: HookEngine, keep_merged: bool, offset: int) -> None:
        """Our clone of the UNet patcher, with the model function wrapper, in place of the current one."""
        args, composed = resolved.args, resolved.composed
        original = p.sd_model.forge_objects.unet
        patcher = original.clone()
        if not keep_merged:
            self.strip(p, patcher, composed)
        inner = ApplyModel()
        cond_rows: list[torch.Tensor | None] = [None]  # the cond rows of the call about to reach the wrapper
        spatial = None
        if args.method == "Spatial":  # apply_model returns denoised predictions of (input, timestep = sigma)
            spatial = Spatial(args.patch, args.temperature, lambda rows: rows_if(cond_rows[0], rows))
        wrapper = generation.method_inner(
            p, resolved, engine, inner, keep_merged, offset, self.device(), spatial=spatial, conflict=batch_conflict
        )
        previous = original.model_options.get("model_function_wrapper")

        def unet_function(apply_model: Callable[..., torch.Tensor], call: dict[str, Any]) -> torch.Tensor:
            """The model function wrapper: the method around each UNet call, inside any wrapper set before."""
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
        names = [generation.prompt_name(n) for n in composed]
        p.multilora_pass = Pass(
            engine, wrapper, p.sampler, p.sd_model, patcher, original, previous, not keep_merged, names
        )
        p.extra_generation_params.update(args.infotext(names))
        p.sd_model.forge_objects.unet = patcher
        engine.install()
        generation.finish_with_sampler(p, p.sampler, self.finish_pass)

    def finish_pass(self, p: Any) -> None:
        """Undo :meth:`install`; safe to call any number of times, from any callback, after any failure."""
        state: Pass | None = vars(p).pop("multilora_pass", None)
        if state is None:
            return
        state.engine.remove()
        generation.unwrap_sampler(state.sampler)
        objects = state.model.forge_objects
        if objects.unet is state.patcher:
            objects.unet = state.original
        # the memory management keeps the clone loaded until the next generation loads a patcher of its own: it
        # must not hold on to the pass (our wrapper's closure holds p, its sampler and the engine)
        if state.previous_wrapper is None:
            state.patcher.model_options.pop("model_function_wrapper", None)
        else:
            state.patcher.set_model_unet_function_wrapper(state.previous_wrapper)
        report_unscheduled(p, state.wrapper, state.names)
        if state.taken_out:  # merge every LoRA back into the weights, as a plain generation leaves them
            self.remerge(state.original)


def through(function: Callable[[torch.Tensor], torch.Tensor], up: torch.Tensor, down: torch.Tensor) -> Any:
    """``function(up)`` when it gives what the merge adds, ``function(up @ down) = function(up) @ down`` (a function
    of the delta's rows: ``swap_scale_shift`` swaps the halves of Flux's final modulation), checked on this LoRA's
    own factors in float32 once per pass, a block of columns of the delta at a time (the whole delta at once would be
    a transient of the layer's size: 150 MB on Flux's final modulation); else None."""
    dtype, up, down = up.dtype, up.float(), down.float().flatten(1)
    try:
        moved = function(up)
        if moved.shape != up.shape:
            return None
        for block in down.split(CHECK_COLUMNS, dim=1):
            if not torch.allclose(function(up.flatten(1) @ block), moved.flatten(1) @ block):
                return None
    except (RuntimeError, ValueError, TypeError, IndexError):
        return None
    return moved.to(dtype)


def applicable(module: nn.Module) -> bool:
    """Whether the engine can apply a delta on this layer: the ops of :class:`DenseDelta` (the backends' ``Linear``
    need not be an ``nn.Linear``; their convs and norms subclass torch's)."""
    return isinstance(module, (nn.Conv2d, nn.GroupNorm, nn.LayerNorm)) or is_linear(module)


def rows_if(cond_rows: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """``cond_rows`` if it is one per row of a call of ``rows`` rows, else None (not known)."""
    return cond_rows if cond_rows is not None and cond_rows.shape[0] == rows else None


def stacked_cond_rows(own: torch.Tensor | None, call_c: dict[str, Any], c: dict[str, Any], rows: int) -> Any:
    """The cond rows of a call that a model function wrapper set before ours makes of the UNet call: MultiDiffusion
    stacks tiles of the latent, each with all of the call's rows in the call's order (its conds repeated per tile),
    so a call of k tiles has the call's cond rows k times over. Only where the call's cross-attention conds confirm
    that layout; None (not known) otherwise."""
    context, tiled = call_c.get("c_crossattn"), c.get("c_crossattn")
    if own is None or rows % own.shape[0] or not isinstance(context, torch.Tensor) or context.shape[0] != own.shape[0]:
        return None
    k = rows // own.shape[0]
    if not isinstance(tiled, torch.Tensor) or not torch.equal(tiled, context.repeat(k, *[1] * (context.dim() - 1))):
        return None
    return own.repeat(k)


def unet_patches(options: dict[str, Any]) -> list[tuple[str, Any]]:
    """(kind, callable) for everything in a call's ``transformer_options`` that the UNet hands the call's rows to
    besides its own layers: other extensions' patches (``"attn1 patch"``, ``"output block patch"``...), attention
    replacements, block modifiers and the group-norm wrapper."""
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
