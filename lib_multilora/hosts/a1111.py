"""Host glue for AUTOMATIC1111 webui 1.10.x (this module is its :class:`generation.Host`): the only module that
touches A1111's sampling and Lora internals.

One sampling pass = :func:`generation.start_pass` (called from ``process_before_every_sampling``) ... ``finish_pass``.
The pass hooks
the UNet layers the composed LoRAs touch and swaps the CFG denoiser's inner model for :class:`MethodInner`. Plain
LoRAs stay merged in the weights, as the webui keeps them, and each LoRA's hooks subtract the other composed ones;
other types are taken out of the built-in ``networks.loaded_networks`` for the pass (in place: clean weights are
restored once, the rest stays merged) and each LoRA's hooks add its own. Finish undoes all of it. It runs when the
sampler returns or raises (per-instance wrappers of the sampler's ``sample``/``sample_img2img``), and again,
idempotently, from ``post_sample``, ``postprocess`` and ``p.close`` so nothing can outlive a generation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import generation, neighbours, webui
from ..args import MIXING, MultiLoraArgs
from ..engine import Delta, DenseDelta, HookEngine, LowRankDelta
from ..generation import Plan, Resolved, prompt_name, report_unscheduled, unwrap_method, warn, wrap_method
from ..inner import MethodInner, runs_batched
from ..reuse import ReusedCalls
from ..spatial import Spatial, StackedCondRows

#: The built-in's layer names (``sd_key``, ``network_layer_mapping``) start with this in the UNet.
UNET_PREFIX = "diffusion_model"
#: The webui merges a LoRA once per mention in the prompt.
merges_each_mention = True
#: SD1, SD2 and SDXL only (``generation.SUPPORTED_MODEL_FLAGS``).
covered_models = generation.NOTHING_COVERED


def builtin_networks() -> Any:
    """The built-in Lora extension's ``networks`` module, imported late: extension load order is not guaranteed."""
    import networks

    return networks


@dataclass
class Pass:
    """Everything one sampling pass changed, so that :func:`finish_pass` can put it back exactly."""

    engine: HookEngine
    original_networks: list[Any]
    static_networks: list[Any] | None  # run during the pass with the composed LoRAs taken out; None: kept merged
    denoiser: Any
    original_inner: nn.Module
    wrapper: MethodInner
    sampler: Any
    model: nn.Module
    names: list[str]  # the composed LoRAs, by index
    activations: int  # the webui's extra-network activations when the pass began (webui.activations)
    reused: list[nn.Module]  # the ControlNet models whose results a call's passes share (reuse_controlnet)


def loaded_networks() -> list[Any]:
    """The built-in's ``loaded_networks`` (one entry per mention: a LoRA written twice is loaded and merged twice)."""
    return list(builtin_networks().loaded_networks)


def refusal(p: Any, resolved: Resolved) -> str | None:
    """Setups where per-pass hooks would be wrong or never run (:func:`host_conflict`)."""
    return host_conflict()


def plan(p: Any, resolved: Resolved) -> Plan | str:
    """The pass's per-layer deltas (:func:`collect_deltas`), with a warning per LoRA whose layers do not fit this
    model, or why the pass must be refused (a LoRA it cannot express)."""
    try:
        if not hasattr(p.sd_model, "network_layer_mapping"):
            builtin_networks().assign_network_names_to_compvis_modules(p.sd_model)
        deltas, misfits = collect_deltas(resolved.composed, resolved.counts, p.sd_model.network_layer_mapping)
    except Exception as e:  # a LoRA type we cannot express: plain behaviour, said out loud
        return f"cannot apply {', '.join(map(prompt_name, resolved.composed))} per pass ({e})"
    warnings = [
        f"{name}: {count} UNet layer(s) do not fit this model (another base model, or a type the built-in cannot "
        "compute); left out, as Merge does"
        for name, count in misfits.items()
    ]
    # fp8 weights round every merge: a complement subtracted in a hook would not cancel what the merge rounded in
    return Plan(deltas, exact_merge=not fp8_weights(), warnings=warnings)


def mute_text_encoder(p: Any, muted: list[Any]) -> list[tuple[Any, float]]:
    """Take the muted LoRAs out of the text encoder: their text encoder multiplier is 0 until sampling starts (the
    built-in merges the text encoder's layers with it on their next forward)."""
    state = [(net, net.te_multiplier) for net in muted]
    for net in muted:
        net.te_multiplier = 0.0
    return state


def unmute_text_encoder(p: Any, state: list[tuple[Any, float]]) -> None:
    """Give the muted LoRAs their text encoder multiplier back and merge it into the text encoder right away, as a
    plain generation leaves it (the UNet's layers are merged on their next forward)."""
    for net, multiplier in state:
        net.te_multiplier = multiplier
    if state:
        mapping = getattr(p.sd_model, "network_layer_mapping", {})
        remerge(builtin_networks(), (m for name, m in mapping.items() if not name.startswith(UNET_PREFIX)))


def spatial_settings(p: Any, args: MultiLoraArgs) -> Spatial | None:
    """Spatial Composite for this pass: the denoiser's inner model returns denoised predictions of ``(x, sigma)`` with
    k-diffusion samplers only, and an edit model's denoiser stacks three kinds of rows; otherwise it runs as
    Composite, said."""
    if args.method != "Spatial":
        return None
    from modules import sd_samplers_kdiffusion

    if not isinstance(p.sampler, sd_samplers_kdiffusion.KDiffusionSampler):
        warn(p, f"Spatial needs a k-diffusion sampler ({p.sampler_name} is not one); running Composite")
        return None
    if getattr(p.sd_model, "cond_stage_key", None) == "edit":
        warn(p, "Spatial cannot tell an edit model's rows apart; running Composite")
        return None
    return Spatial(args.patch, args.temperature, StackedCondRows())


def on_cfg_denoiser(params: Any) -> None:
    """Each denoiser call stacks its cond rows first: Spatial Composite's row tracker starts over (A1111's
    ``on_cfg_denoiser``, before the inner model runs)."""
    p = getattr(params.denoiser, "p", None)
    state: Pass | None = vars(p).get("multilora_pass") if p is not None else None
    spatial = state.wrapper.spatial if state is not None else None
    if spatial is not None:
        cond = params.text_cond
        first = next(iter(cond.values())) if isinstance(cond, dict) else cond
        spatial.cond_rows.start(first.shape[0])


def current_model() -> Any:
    """The model the webui has loaded now (a refiner switch replaces the one a pass started with)."""
    from modules import shared

    return shared.sd_model


def device() -> torch.device:
    """The device the webui runs the model on."""
    from modules import devices

    return devices.device


def splits_batch(p: Any, args: MultiLoraArgs) -> bool:
    """Whether a webui feature or another extension splits the batch inside the UNet this pass (Hypertile tiles each
    image in the self-attention layers; Regional Prompter's attention mode divides the rows by the batch size), so
    that a Batched Composite's row groups cannot be told apart: said, and run sequentially from the start. (Any other
    layer that sees another row count makes the wrapper fall back at its first call.)"""
    from modules import shared

    opts = shared.opts
    hypertile = getattr(opts, "hypertile_enable_unet", False) or (
        getattr(p, "is_hr_pass", False) and getattr(opts, "hypertile_enable_unet_secondpass", False)
    )
    splitter = "Hypertile U-Net splits the batch inside the UNet" if hypertile else neighbours.splits_batch(p)
    if splitter and args.method in MIXING and runs_batched(args.execution, device()):
        warn(p, f"{splitter}; running Composite sequentially")
    return splitter is not None


def fp8_weights() -> bool:
    """Whether the webui stores the model's weights in fp8 (Settings: FP8 weight)."""
    from modules import devices

    return bool(devices.fp8)


def host_conflict() -> str | None:
    """Setups where per-pass LoRA hooks would be wrong or never run; detected, refused, said out loud."""
    from modules import sd_unet

    networks = builtin_networks()
    if sd_unet.current_unet is not None:
        return f"the UNet is replaced by {type(sd_unet.current_unet).__name__} (TensorRT/sd_unet), hooks cannot run"
    for layer, patched in ((nn.Linear, networks.network_Linear_forward), (nn.Conv2d, networks.network_Conv2d_forward)):
        if class_forward(layer) is not patched:
            return (
                f"another extension replaced torch.nn.{layer.__name__}.forward (Regional Prompter latent mode or "
                "composable-lora?) and applies LoRAs itself"
            )
    return None


def class_forward(layer: type[nn.Module]) -> Any:
    """``layer.forward`` as the extensions set it: under the webui's manual cast (``devices.manual_cast``: fp8 weights
    with fp32 inference, GTX 16xx, MPS, XPU) the class's forward is a cast wrapper around it, kept as
    ``org_forward``."""
    forward = layer.forward
    if getattr(forward, "__module__", None) == "modules.devices" and hasattr(layer, "org_forward"):
        return layer.org_forward
    return forward


def collect_deltas(
    composed: list[Any], counts: list[int], layer_mapping: dict[str, nn.Module]
) -> tuple[dict[nn.Module, dict[int, Delta]], dict[str, int]]:
    """Per UNet layer, the delta of each composed LoRA touching it (LoRA k = index k; ``counts[k]`` times, as the
    webui merges it), and per LoRA name the number of layers left out because the delta does not fit them.
    Text-encoder layers are left to the webui: conditioning is computed before sampling starts."""
    deltas: dict[nn.Module, dict[int, Delta]] = {}
    misfits: dict[str, int] = {}
    functional = lora_functional()
    for k, (net, count) in enumerate(zip(composed, counts, strict=True)):
        for net_module in net.modules.values():
            if not net_module.sd_key.startswith(UNET_PREFIX):
                continue
            module = layer_mapping.get(net_module.sd_key)
            if module is None:
                continue
            delta = make_delta(net_module, module, count, functional)
            if isinstance(delta, LowRankDelta) or fits(net_module, module):
                deltas.setdefault(module, {})[k] = delta
            else:
                misfits[prompt_name(net)] = misfits.get(prompt_name(net), 0) + 1
    return deltas, misfits


def lora_functional() -> bool:
    """The built-in's "Lora/Networks: use old method" option: LoRAs applied in each forward instead of merged."""
    from modules import shared

    return bool(getattr(shared.opts, "lora_functional", False))


def pads_to_inpainting(shape: tuple[int, ...], weight: torch.Tensor) -> bool:
    """A 4-channel conv delta on a 9-channel inpainting conv: the merge zero-pads it, the hooks apply it to the first
    4 input channels, which is the same."""
    return weight.dim() == 4 and weight.shape[1] == 9 and len(shape) == 4 and shape[1] == 4


def merged_shape(shape: tuple[int, ...], weight: torch.Tensor) -> tuple[int, ...]:
    """The shape a delta is added to the weight as, by the merge's rules: reshaped when the element counts match
    (``NetworkModule.finalize_updown``), padded on an inpainting conv."""
    if math.prod(shape) == weight.numel():
        return tuple(weight.shape)
    if pads_to_inpainting(shape, weight):
        return (shape[0], 9, *shape[2:])
    return shape


def fits(net_module: Any, module: nn.Module) -> bool:
    """Whether the webui's merge could add this LoRA module's dense delta to the layer. A LoRA made for another base
    model matches layer names with other shapes; the merge skips those layers (its RuntimeError), a hook would fail
    the whole generation. Checked on the meta device: shapes only, no data."""
    weight = getattr(module, "weight", None)
    if weight is None:  # no weight to compare with: let the pass try
        return True
    try:
        shape = tuple(net_module.calc_updown(torch.empty_like(weight, device="meta"))[0].shape)
    except NotImplementedError:  # an op without a meta kernel: no answer, let the pass try
        return True
    except RuntimeError:
        return False
    try:
        return torch.broadcast_shapes(merged_shape(shape, weight), tuple(weight.shape)) == weight.shape
    except RuntimeError:
        return False


def make_delta(net_module: Any, module: nn.Module, count: int, functional: bool) -> LowRankDelta | DenseDelta:
    """The low-rank path for a plain LoRA on a Linear/Conv2d whose factors line up with the weight as they are; the
    built-in's own dense ``calc_updown`` for everything else (LyCORIS types, DoRA, CP, deltas the merge reshapes),
    checked by :func:`fits`. ``count`` times, as the webui merges a LoRA once per mention."""
    down_model, up_model = getattr(net_module, "down_model", None), getattr(net_module, "up_model", None)
    plain = (
        down_model is not None
        and up_model is not None
        and getattr(net_module, "mid_model", None) is None
        and net_module.dora_scale is None
        and net_module.bias is None
    )
    weight = getattr(module, "weight", None)
    linear = isinstance(module, nn.Linear) and down_model is not None and down_model.weight.dim() == 2
    conv = isinstance(module, nn.Conv2d) and down_model is not None and down_model.weight.dim() == 4
    if plain and weight is not None and (linear or conv):
        down, up, scale = _low_rank(net_module, dyn=not functional)
        shape = (up.shape[0], *down.shape[1:])
        if shape == tuple(weight.shape) or pads_to_inpainting(shape, weight):
            return LowRankDelta(down, up, scale * count)

    def compute(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As the merge adds each of the ``count`` entries: computed on the weight the previous ones left."""
        total, bias = None, None
        for _ in range(count):
            updown, ex_bias = net_module.calc_updown(m.weight if total is None else m.weight + total)
            total = updown if total is None else total + updown
            bias = ex_bias if bias is None or ex_bias is None else bias + ex_bias
        return total, bias

    return DenseDelta(compute)


def _low_rank(net_module: Any, dyn: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``down``, ``up`` and the scale the built-in gives them. ``dyn``: cut to the tag's ``dyn`` rank, as the merge
    does (the old forward-time path, ``lora_functional``, ignores it)."""
    down, up = net_module.down_model.weight.detach(), net_module.up_model.weight.detach()
    dyn_dim = net_module.network.dyn_dim
    if dyn and isinstance(dyn_dim, int):
        down, up = down[:dyn_dim], up[:, :dyn_dim]
    return down, up, float(net_module.multiplier() * net_module.calc_scale())


def install(p: Any, resolved: Resolved, engine: HookEngine, keep_merged: bool, offset: int) -> None:
    """Swap the CFG denoiser's inner model for the method and hook the layers; plain LoRAs stay merged, other types
    are taken out of the built-in's list for the pass."""
    loaded, composed = resolved.loaded, resolved.composed
    static = None if keep_merged else [n for n in loaded if all(n is not c for c in composed)]
    denoiser = p.sampler.model_wrap_cfg
    original_inner = denoiser.inner_model
    wrapper = generation.method_inner(
        p,
        resolved,
        engine,
        original_inner,
        keep_merged,
        offset,
        device(),
        splits=splits_batch(p, resolved.args),
        spatial=spatial_settings(p, resolved.args),
    )
    names = [prompt_name(n) for n in composed]
    reused = reuse_controlnet(p) if resolved.args.method in MIXING else []
    p.multilora_pass = Pass(
        engine,
        loaded,
        static,
        denoiser,
        original_inner,
        wrapper,
        p.sampler,
        p.sd_model,
        names,
        webui.activations,
        reused,
    )
    p.extra_generation_params.update(resolved.args.infotext(names))
    if static is not None:
        builtin_networks().loaded_networks[:] = static
    denoiser.model_wrap = wrapper
    engine.install()
    generation.finish_with_sampler(p, p.sampler, finish_pass)
    # A refiner switch mid-sampling loads another model and computes its conds through p.setup_conds: the pass ends
    # there, and the refiner part runs as the webui runs it.
    wrap_method(p, "setup_conds", end_at_refiner)


def reuse_controlnet(p: Any) -> list[nn.Module]:
    """Mikubill's ControlNet computes each unit's control inside every UNet forward: the passes of one Composite or
    Spatial call (the same input, timestep and conds, no LoRA in the control) share it, computed once
    (:class:`reuse.ReusedCalls` in place of each control model's ``forward`` for the pass), unless the setting
    "Reuse ControlNet's control across a call's passes" is off."""
    from modules import shared

    if not getattr(shared.opts, "multilora_controlnet_reuse", True):
        return []
    units = neighbours.controlnet_models(p)
    models = {id(m): m for m in units if isinstance(m, nn.Module) and "forward" not in vars(m)}.values()
    for model in models:  # as many results kept as there are units: two may share a model, with their own hints
        model.forward = ReusedCalls(model.forward, size=len(units))
    return list(models)


def end_at_refiner(p: Any) -> None:
    """The webui switches to the refiner checkpoint mid-sampling: end the pass there, and say so."""
    if "multilora_pass" in vars(p):
        warn(p, "the refiner part runs without Multi-LoRA, as the webui runs it")
    finish_pass(p)


def finish_pass(p: Any) -> None:
    """Undo :func:`install`; safe to call any number of times, from any callback, after any failure."""
    unwrap_method(p, "setup_conds")
    state: Pass | None = vars(p).pop("multilora_pass", None)
    if state is None:
        return
    state.engine.remove()
    generation.unwrap_sampler(state.sampler)
    for model in state.reused:
        if isinstance(vars(model).get("forward"), ReusedCalls):
            del model.forward
    if state.denoiser._modules.get("model_wrap") is state.wrapper:
        state.denoiser.model_wrap = state.original_inner
    report_unscheduled(p, state.wrapper, state.names)
    static = state.static_networks
    if static is None:  # the composed LoRAs stayed merged: no weight was touched
        return
    networks = builtin_networks()
    current = networks.loaded_networks
    # Put the composed LoRAs back unless the host re-activated networks meanwhile (hires pass, refiner load).
    untouched = state.activations == webui.activations
    if untouched and len(current) == len(static) and all(a is b for a, b in zip(current, static, strict=True)):
        current[:] = state.original_networks
        if state.model is current_model():  # a refiner switch unloaded it: it merges on its next forward, if ever
            remerge(networks, state.model.modules())


def remerge(networks: Any, modules: Iterable[nn.Module]) -> None:
    """Merge the current list into layers left with another set (the UNet after an unmerged pass, the text encoder
    after a policy), as a plain generation leaves them; the built-in skips every layer already in that state."""
    with torch.no_grad():
        for module in modules:
            if hasattr(module, "network_current_names"):
                networks.network_apply_weights(module)
