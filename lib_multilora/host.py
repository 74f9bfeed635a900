"""Host glue for AUTOMATIC1111 webui 1.10.x: the only module that touches webui internals.

One sampling pass = ``start_pass`` (called from ``process_before_every_sampling``) ... ``finish_pass``. Start hooks
the UNet layers the composed LoRAs touch and swaps the CFG denoiser's inner model for :class:`MethodInner`. Plain
LoRAs stay merged in the weights, as the webui keeps them, and each LoRA's hooks subtract the other composed ones;
other types are taken out of the built-in ``networks.loaded_networks`` for the pass (in place: clean weights are
restored once, the rest stays merged) and each LoRA's hooks add its own. Finish undoes all of it. It runs when the
sampler returns or raises (per-instance wrappers of the sampler's ``sample``/``sample_img2img``), and again,
idempotently, from ``post_sample``, ``postprocess`` and ``p.close`` so nothing can outlive a generation.
"""

from __future__ import annotations

import logging
import math
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .args import MERGE, ArgsError, MultiLoraArgs, label_of
from .engine import Delta, DenseDelta, HookEngine, LowRankDelta, complements
from .inner import MethodInner, runs_batched
from .plan import select
from .schedule import sampling_step
from .tags import TAG_NAME, apply_tags, strip_malformed

log = logging.getLogger("multilora")

SAMPLER_METHODS = ("sample", "sample_img2img")
#: The built-in's layer names (``sd_key``, ``network_layer_mapping``) start with this in the UNet.
UNET_PREFIX = "diffusion_model"
#: Every infotext key this extension writes starts with this.
INFOTEXT_PREFIX = "Multi-LoRA"
WARNING_LABEL = "Multi-LoRA warning"
#: How many times the webui has activated extra networks (our tag network's ``activate`` runs in each activation).
#: A pass that sees it move knows the host reloaded the built-in's LoRA list meanwhile, even when the new list looks
#: like the one the pass left (loading a refiner checkpoint mid-sampling clears it: ``sd_models.get_empty_cond``).
activations = 0
#: The webui's model-type flags (``sd_models.set_model_type``) of the architectures the engine covers.
SUPPORTED_MODEL_FLAGS = ("is_sd1", "is_sd2", "is_sdxl")


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
    activations: int  # the webui's extra-network activations when the pass began


@dataclass
class Resolved:
    """What a pass composes: the effective args, the built-in's loaded LoRAs, the composed ones (in order) and how
    many times each is loaded (the webui merges one entry per mention)."""

    args: MultiLoraArgs
    loaded: list[Any]
    composed: list[Any]
    counts: list[int]


def on_process(p: Any, script_args: tuple) -> None:
    """Read the panel/API args once per generation; make cleanup unconditional via ``p.close``."""
    adopt(p)
    finish_pass(p)
    p.multilora_tags = []
    p.multilora_warnings = []
    # X/Y/Z cells are shallow copies of one p sharing this dict: drop what an earlier cell wrote, write to our own
    p.extra_generation_params = {
        key: value for key, value in p.extra_generation_params.items() if not key.startswith(INFOTEXT_PREFIX)
    }
    try:
        p.multilora_args = MultiLoraArgs.from_script_args(script_args)
    except ArgsError as e:
        p.multilora_args = MultiLoraArgs()
        warn(p, f"bad script args: {e}; running without Multi-LoRA")
    for attr in ("all_prompts", "all_hr_prompts"):
        prompts = getattr(p, attr, None)
        if prompts:
            cleaned = [strip_malformed(prompt) for prompt in prompts]
            setattr(p, attr, [c[0] for c in cleaned])
            for message in dict.fromkeys(w for c in cleaned for w in c[1]):
                warn(p, message)
    override = getattr(p, "multilora_override", None)  # set by X/Y/Z axes
    if override:
        try:
            p.multilora_args = MultiLoraArgs.from_dict({**vars(p.multilora_args), **override})
        except ArgsError as e:
            warn(p, f"bad X/Y/Z value: {e}")
    if getattr(p, "multilora_cell_is_merge", False):
        p.extra_generation_params[label_of("method")] = MERGE


def adopt(p: Any) -> None:
    """Wrap this ``p``'s ``close`` (cleanup that runs whatever happened) and ``calculate_hr_conds`` (the text-encoder
    policy for the hires conds), once. ``copy(p)`` copies the instance dict, and with it the wrappers and pass state
    of the original: they are dropped and this copy gets its own, so that its cleanup never undoes the original's."""
    if vars(p).get("multilora_owner") is p:
        return
    for key in ("multilora_pass", "multilora_muted_te"):
        vars(p).pop(key, None)
    wrap_method(p, "close", close_generation)
    wrap_method(p, "calculate_hr_conds", before_hires_conds)  # txt2img only
    p.multilora_owner = p


def wrap_method(p: Any, name: str, before: Callable[[Any], None]) -> None:
    """``p.<name>`` as an instance attribute that runs ``before(p)`` first, then the method it replaces (also when
    ``before`` raises). A wrapper copied from another ``p`` is unwrapped and its method rebound to this one."""
    method = getattr(p, name, None)
    if method is None:
        return
    source = getattr(method, "multilora_of", None)
    if source is not None:
        method = method.multilora_wrapped
        if getattr(method, "__self__", None) is source:
            method = types.MethodType(method.__func__, p)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            before(p)
        finally:
            result = method(*args, **kwargs)
        return result

    wrapper.multilora_of, wrapper.multilora_wrapped = p, method  # type: ignore[attr-defined]
    setattr(p, name, wrapper)


def close_generation(p: Any) -> None:
    try:
        finish_pass(p)
    finally:
        restore_text_encoder(p)


def warn(p: Any, message: str) -> None:
    """Tell the user in the infotext and the console, once per generation; never raise."""
    warnings = vars(p).setdefault("multilora_warnings", [])
    if message in warnings:
        return
    warnings.append(message)
    text = f"Multi-LoRA: {message}"
    log.warning(text)
    p.comment(text)
    p.extra_generation_params[WARNING_LABEL] = "; ".join(warnings)


def resolve(p: Any) -> Resolved | None:
    """The effective args (panel, then tags) and the loaded/composed LoRAs for the current batch or pass, or None
    when nothing is to be composed (disabled, or bad input, which is reported)."""
    args = getattr(p, "multilora_args", None)
    if args is None:
        return None
    args, tag_warnings = apply_tags(args, getattr(p, "multilora_tags", []))
    for w in tag_warnings:
        warn(p, w)
    if not args.enabled:
        return None
    problems = args.problems()
    if problems:
        warn(p, "; ".join(problems) + "; running without Multi-LoRA")
        return None
    loaded = list(builtin_networks().loaded_networks)
    selection = select([(n.name, network_names(n)) for n in loaded], args.lora_names)
    for w in selection.warnings:
        warn(p, w)
    if selection.error:
        warn(p, selection.error + "; running without Multi-LoRA")
        return None
    return Resolved(args, loaded, [loaded[i] for i in selection.composed], selection.counts)


def plan_pass(p: Any, resolved: Resolved) -> tuple[dict[nn.Module, dict[int, Delta]], dict[str, int]] | str:
    """The pass's per-layer deltas and misfit counts (:func:`collect_deltas`), or why the pass must be refused."""
    refusal = host_conflict() or unsupported_model(p.sd_model)
    if refusal:
        return refusal
    try:
        if not hasattr(p.sd_model, "network_layer_mapping"):
            builtin_networks().assign_network_names_to_compvis_modules(p.sd_model)
        return collect_deltas(resolved.composed, resolved.counts, p.sd_model.network_layer_mapping)
    except Exception as e:  # a LoRA type we cannot express: plain behaviour, said out loud
        return f"cannot apply {', '.join(n.name for n in resolved.composed)} per pass ({e})"


def apply_text_encoder_policy(p: Any) -> None:
    """Before conds are computed: take composed LoRAs out of the text encoder as the policy says (their text encoder
    multiplier set to 0 until sampling starts) and make this generation compute, and cache, its own conds. Not for a
    pass that will be refused: that one runs as a plain generation, text encoder included."""
    if "multilora_muted_te" in vars(p):
        return
    resolved = resolve(p)
    if resolved is None or resolved.args.text_encoder == "All" or isinstance(plan_pass(p, resolved), str):
        return
    keep = resolved.composed[:1] if resolved.args.text_encoder == "First" else []
    muted = [(net, net.te_multiplier) for net in resolved.composed if all(net is not k for k in keep)]
    for net, _ in muted:
        net.te_multiplier = 0.0
    p.multilora_muted_te = muted
    # The webui caches conds by prompt and network params, not by text-encoder weights, in lists shared by every
    # generation (class attributes): this generation gets lists of its own.
    p.cached_c, p.cached_uc = [None, None], [None, None]
    if hasattr(p, "cached_hr_c"):
        p.cached_hr_c, p.cached_hr_uc = [None, None], [None, None]


def before_hires_conds(p: Any) -> None:
    """The webui computes the hires conds after re-activating the LoRAs for the hires pass (or during the first
    pass's setup, with "use the first pass's conds"): they get the policy too, except when the hires pass runs merged
    (hires mode Off)."""
    try:
        resolved = resolve(p)
        if resolved is not None and resolved.args.hires == "Off":
            restore_text_encoder(p)
        else:
            apply_text_encoder_policy(p)
    except Exception as e:  # never break the generation: plain conds, said out loud
        restore_text_encoder(p)
        warn(p, f"internal error in the text-encoder policy for the hires pass, using All: {e!r}")


def restore_text_encoder(p: Any) -> None:
    """Give the muted LoRAs their text encoder multiplier back and merge it into the text encoder right away, as a
    plain generation leaves it (the UNet's layers are merged on their next forward)."""
    muted = vars(p).pop("multilora_muted_te", [])
    for net, multiplier in muted:
        net.te_multiplier = multiplier
    if muted:
        mapping = getattr(p.sd_model, "network_layer_mapping", {})
        remerge(builtin_networks(), (m for name, m in mapping.items() if not name.startswith(UNET_PREFIX)))


def start_pass(p: Any) -> None:
    """Install the chosen method for the sampling pass about to run (first pass or hires pass)."""
    finish_pass(p)
    restore_text_encoder(p)
    resolved = resolve(p)
    if resolved is None:
        return
    offset = 0
    if getattr(p, "is_hr_pass", False):
        if resolved.args.hires == "Off":
            return
        offset = p.steps if resolved.args.hires == "Continue" else 0
    planned = plan_pass(p, resolved)
    if isinstance(planned, str):
        warn(p, f"{planned}; running without Multi-LoRA")
        return
    deltas, misfits = planned
    for name, count in misfits.items():
        warn(p, f"{name}: {count} UNet layer(s) do not fit this model (another base model?); left out, as Merge does")
    untouched = [n.name for k, n in enumerate(resolved.composed) if not any(k in d for d in deltas.values())]
    if untouched:
        warn(p, f"{', '.join(untouched)} touch no UNet layer (text encoder only?)")
    # fp8 weights round every merge: a complement subtracted in a hook would not cancel what the merge rounded in
    keep_merged = not fp8_weights() and all(
        isinstance(d, LowRankDelta) for per_layer in deltas.values() for d in per_layer.values()
    )
    engine = build_engine(deltas, len(resolved.composed), keep_merged, stack=webui_device().type == "cuda")
    install(p, resolved, engine, keep_merged, offset)


def current_model() -> Any:
    """The model the webui has loaded now (a refiner switch replaces the one a pass started with)."""
    from modules import shared

    return shared.sd_model


def webui_device() -> torch.device:
    """The device the webui runs the model on."""
    from modules import devices

    return devices.device


def splits_batch(p: Any, args: MultiLoraArgs) -> bool:
    """Whether a webui feature splits the batch inside the UNet this pass (Hypertile tiles each image in the
    self-attention layers), so that a Batched Composite's row groups cannot be told apart: said, and run sequentially
    from the start. (Any other layer that sees another row count makes the wrapper fall back at its first call.)"""
    from modules import shared

    opts = shared.opts
    hypertile = getattr(opts, "hypertile_enable_unet", False) or (
        getattr(p, "is_hr_pass", False) and getattr(opts, "hypertile_enable_unet_secondpass", False)
    )
    if hypertile and args.method == "Composite" and runs_batched(args.execution, webui_device()):
        warn(p, "Hypertile U-Net splits the batch inside the UNet; running Composite sequentially")
    return bool(hypertile)


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


def unsupported_model(model: Any) -> str | None:
    """Only SD1, SD2 and SDXL UNets are covered: other architectures have LoRA layers the built-in applies in ways
    the engine does not (SD3's joint q/k/v projections), which would be neither switched nor taken out."""
    if any(getattr(model, flag, False) for flag in SUPPORTED_MODEL_FLAGS):
        return None
    kind = "SD3" if getattr(model, "is_sd3", False) else type(model).__name__
    return f"{kind} models are not supported (SD1, SD2 and SDXL are)"


def network_names(net: Any) -> frozenset[str]:
    """Every name a loaded LoRA answers to (lora-block-weight renames ``name``; users type aliases)."""
    disk = getattr(net, "network_on_disk", None)
    names = {net.name, getattr(net, "mentioned_name", None), getattr(disk, "name", None), getattr(disk, "alias", None)}
    return frozenset(n for n in names if n)


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
                misfits[net.name] = misfits.get(net.name, 0) + 1
    return deltas, misfits


def lora_functional() -> bool:
    """The built-in's "Lora/Networks: use old method" option: LoRAs applied in each forward instead of merged."""
    from modules import shared

    return bool(getattr(shared.opts, "lora_functional", False))


def build_engine(deltas: dict[nn.Module, dict[int, Delta]], n: int, keep_merged: bool, stack: bool) -> HookEngine:
    """The pass's hooks: with ``keep_merged`` (every delta plain low-rank) the composed LoRAs stay merged in the
    weights, as the webui keeps them between generations, and LoRA k's hook subtracts the others
    (:func:`complements`), so the pass touches no weight and costs the hooks only. Otherwise (LyCORIS types, DoRA:
    deltas computed from the weight, which need not add up) the composed LoRAs are taken out of the weights for the
    pass and LoRA k's hook adds its own delta. ``stack`` (batched Composite as batched matmuls) only pays on a GPU,
    where it saves kernel launches; on a CPU the per-group loop is faster (bench/engine_micro.py: 1.2x)."""
    engine = HookEngine(stack=stack)
    for module, per_layer in deltas.items():
        for k, delta in (complements(per_layer, n) if keep_merged else per_layer).items():
            engine.add(module, k, delta)
    return engine


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


def install(p: Any, resolved: Resolved, engine: HookEngine, keep_merged: bool, step_offset: int) -> None:
    args, loaded, composed = resolved.args, resolved.loaded, resolved.composed
    static = None if keep_merged else [n for n in loaded if all(n is not c for c in composed)]
    denoiser = p.sampler.model_wrap_cfg
    original_inner = denoiser.inner_model
    wrapper = MethodInner(
        original_inner,
        engine,
        args.method,
        len(composed),
        args.tau,
        step=lambda: step_offset + sampling_step(denoiser.step, denoiser.total_steps, denoiser.steps),
        observer=getattr(p, "multilora_observer", None),  # set by the test probe
        batched=runs_batched(args.execution, webui_device()) and not splits_batch(p, args),
        warn=lambda message: warn(p, message),
    )
    names = [n.name for n in composed]
    p.multilora_pass = Pass(
        engine, loaded, static, denoiser, original_inner, wrapper, p.sampler, p.sd_model, names, activations
    )
    p.extra_generation_params.update(args.infotext(names))
    if static is not None:
        builtin_networks().loaded_networks[:] = static
    denoiser.model_wrap = wrapper
    engine.install()
    for name in SAMPLER_METHODS:
        original = getattr(p.sampler, name)

        def run_then_finish(*a: Any, _original: Any = original, **kw: Any) -> Any:
            try:
                return _original(*a, **kw)
            finally:
                finish_pass(p)

        setattr(p.sampler, name, run_then_finish)
    # A refiner switch mid-sampling loads another model and computes its conds through p.setup_conds: the pass ends
    # there, and the refiner part runs as the webui runs it (every LoRA merged).
    wrap_method(p, "setup_conds", finish_pass)


def finish_pass(p: Any) -> None:
    """Undo :func:`install`; safe to call any number of times, from any callback, after any failure."""
    setup_conds = vars(p).get("setup_conds")
    if getattr(setup_conds, "multilora_of", None) is p:
        p.setup_conds = setup_conds.multilora_wrapped
    state: Pass | None = vars(p).pop("multilora_pass", None)
    if state is None:
        return
    state.engine.remove()
    for name in SAMPLER_METHODS:
        vars(state.sampler).pop(name, None)
    if state.denoiser._modules.get("model_wrap") is state.wrapper:
        state.denoiser.model_wrap = state.original_inner
    unused = [name for k, name in enumerate(state.names) if k not in state.wrapper.used]
    if state.wrapper.used and unused:
        warn(p, f"{', '.join(unused)} got no step (more LoRAs than the steps run allow at this switch interval)")
    static = state.static_networks
    if static is None:  # the composed LoRAs stayed merged: no weight was touched
        return
    networks = builtin_networks()
    current = networks.loaded_networks
    # Put the composed LoRAs back unless the host re-activated networks meanwhile (hires pass, refiner load).
    untouched = state.activations == activations
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


def tag_network() -> Any:
    """The ``<multilora:...>`` extra network: the webui strips the tag and hands us its items per batch."""
    from modules import extra_networks

    class ExtraNetworkMultiLora(extra_networks.ExtraNetwork):
        def __init__(self) -> None:
            super().__init__(TAG_NAME)

        def activate(self, p: Any, params_list: list[Any]) -> None:
            global activations
            activations += 1
            p.multilora_tags = [list(map(str, params.items)) for params in params_list]

        def deactivate(self, p: Any) -> None:
            pass

    return ExtraNetworkMultiLora()


def register_tag_network() -> None:
    from modules import extra_networks

    extra_networks.register_extra_network(tag_network())
