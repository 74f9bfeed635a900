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
from collections.abc import Iterable
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


def on_process(p: Any, script_args: tuple) -> None:
    """Read the panel/API args once per generation; make cleanup unconditional via ``p.close``."""
    finish_pass(p)
    p.multilora_tags = []
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
    if "close" not in vars(p):
        original_close = p.close

        def close() -> None:
            try:
                finish_pass(p)
                restore_text_encoder(p)
            finally:
                original_close()

        p.close = close


def warn(p: Any, message: str) -> None:
    """Tell the user in the infotext and the console, once per generation; never raise."""
    previous = p.extra_generation_params.get("Multi-LoRA warning")
    if previous and message in previous.split("; "):
        return
    text = f"Multi-LoRA: {message}"
    log.warning(text)
    p.comment(text)
    p.extra_generation_params["Multi-LoRA warning"] = f"{previous}; {message}" if previous else message


def resolve(p: Any) -> tuple[MultiLoraArgs, list[Any], list[Any]] | None:
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
    return args, loaded, [loaded[i] for i in selection.composed]


def apply_text_encoder_policy(p: Any) -> None:
    """Before the conds are computed: take composed LoRAs out of the text encoder as the policy says (their text
    encoder multiplier set to 0 until sampling starts) and make this generation compute its own conds."""
    resolved = resolve(p)
    if resolved is None or resolved[0].text_encoder == "All":
        return
    args, _, composed = resolved
    keep = composed[:1] if args.text_encoder == "First" else []
    muted = [(net, net.te_multiplier) for net in composed if all(net is not k for k in keep)]
    for net, _ in muted:
        net.te_multiplier = 0.0
    p.multilora_muted_te = muted
    # The webui caches conds by prompt and network params, not by text-encoder weights: bypass its shared cache.
    p.cached_c, p.cached_uc = [None, None], [None, None]


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
    args, loaded, composed = resolved
    conflict = host_conflict()
    if conflict:
        warn(p, f"{conflict}; running without Multi-LoRA")
        return
    offset = 0
    if getattr(p, "is_hr_pass", False):
        if args.hires == "Off":
            return
        offset = p.steps if args.hires == "Continue" else 0
    networks = builtin_networks()
    try:
        if not hasattr(p.sd_model, "network_layer_mapping"):
            networks.assign_network_names_to_compvis_modules(p.sd_model)
        deltas, misfits = collect_deltas(composed, p.sd_model.network_layer_mapping)
    except Exception as e:  # a LoRA type we cannot express: plain behaviour, said out loud
        warn(p, f"cannot apply {', '.join(n.name for n in composed)} per pass ({e}); running without Multi-LoRA")
        return
    for name, count in misfits.items():
        warn(p, f"{name}: {count} UNet layer(s) do not fit this model (another base model?); left out, as Merge does")
    untouched = [n.name for k, n in enumerate(composed) if not any(k in d for d in deltas.values())]
    if untouched:
        warn(p, f"{', '.join(untouched)} touch no UNet layer (text encoder only?)")
    keep_merged = all(isinstance(d, LowRankDelta) for per_layer in deltas.values() for d in per_layer.values())
    engine = build_engine(deltas, len(composed), keep_merged, stack=webui_device().type == "cuda")
    install(p, args, loaded, composed, engine, keep_merged, offset)


def webui_device() -> torch.device:
    """The device the webui runs the model on."""
    from modules import devices

    return devices.device


def host_conflict() -> str | None:
    """Setups where per-pass LoRA hooks would be wrong or never run; detected, refused, said out loud."""
    from modules import sd_unet

    networks = builtin_networks()
    if sd_unet.current_unet is not None:
        return f"the UNet is replaced by {type(sd_unet.current_unet).__name__} (TensorRT/sd_unet), hooks cannot run"
    for layer, patched in ((nn.Linear, networks.network_Linear_forward), (nn.Conv2d, networks.network_Conv2d_forward)):
        if layer.forward is not patched:
            return (
                f"another extension replaced torch.nn.{layer.__name__}.forward (Regional Prompter latent mode or "
                "composable-lora?) and applies LoRAs itself"
            )
    return None


def network_names(net: Any) -> frozenset[str]:
    """Every name a loaded LoRA answers to (lora-block-weight renames ``name``; users type aliases)."""
    disk = getattr(net, "network_on_disk", None)
    names = {net.name, getattr(net, "mentioned_name", None), getattr(disk, "name", None), getattr(disk, "alias", None)}
    return frozenset(n for n in names if n)


def collect_deltas(
    composed: list[Any], layer_mapping: dict[str, nn.Module]
) -> tuple[dict[nn.Module, dict[int, Delta]], dict[str, int]]:
    """Per UNet layer, the delta of each composed LoRA touching it (LoRA k = index k), and per LoRA name the number
    of layers left out because the delta does not fit them. Text-encoder layers are left to the webui: conditioning is
    computed with every LoRA before sampling starts."""
    deltas: dict[nn.Module, dict[int, Delta]] = {}
    misfits: dict[str, int] = {}
    for k, net in enumerate(composed):
        for net_module in net.modules.values():
            if not net_module.sd_key.startswith(UNET_PREFIX):
                continue
            module = layer_mapping.get(net_module.sd_key)
            if module is None:
                continue
            delta = make_delta(net_module, module)
            if fits(net_module, module, delta):
                deltas.setdefault(module, {})[k] = delta
            else:
                misfits[net.name] = misfits.get(net.name, 0) + 1
    return deltas, misfits


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


def fits(net_module: Any, module: nn.Module, delta: Delta) -> bool:
    """Whether the webui's merge could add this delta to the layer. A LoRA made for another base model matches layer
    names with other shapes; the merge skips those layers (its RuntimeError), a hook would fail the whole generation.
    Same rule as the merge (broadcast onto the weight, 4-channel deltas padded on 9-channel inpainting convs), on
    the factors' shapes for a low-rank delta, else on the meta device: shapes only, no data."""
    weight = getattr(module, "weight", None)
    if weight is None:  # no weight to compare with: let the pass try
        return True
    if isinstance(delta, LowRankDelta):
        shape = (delta.up.shape[0], *delta.down.shape[1:])
    else:
        try:
            shape = tuple(net_module.calc_updown(torch.empty_like(weight, device="meta"))[0].shape)
        except NotImplementedError:  # an op without a meta kernel: no answer, let the pass try
            return True
        except RuntimeError:
            return False
    if weight.dim() == 4 and weight.shape[1] == 9 and len(shape) == 4 and shape[1] == 4:
        shape = (shape[0], 9, *shape[2:])
    try:
        return torch.broadcast_shapes(shape, tuple(weight.shape)) == weight.shape
    except RuntimeError:
        return False


def make_delta(net_module: Any, module: nn.Module) -> LowRankDelta | DenseDelta:
    """Low-rank path for plain LoRA on Linear/Conv2d; the built-in's own dense ``calc_updown`` for the rest."""
    down_model, up_model = getattr(net_module, "down_model", None), getattr(net_module, "up_model", None)
    plain = (
        down_model is not None
        and up_model is not None
        and getattr(net_module, "mid_model", None) is None
        and net_module.dora_scale is None
        and net_module.bias is None
    )
    if plain and isinstance(module, nn.Linear) and down_model.weight.dim() == 2:
        return LowRankDelta(*_low_rank(net_module))
    if plain and isinstance(module, nn.Conv2d) and tuple(down_model.weight.shape[2:]) == tuple(module.kernel_size):
        return LowRankDelta(*_low_rank(net_module))

    def compute(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        return net_module.calc_updown(m.weight)

    return DenseDelta(compute)


def _low_rank(net_module: Any) -> tuple[torch.Tensor, torch.Tensor, float]:
    down, up = net_module.down_model.weight.detach(), net_module.up_model.weight.detach()
    dyn = net_module.network.dyn_dim
    if isinstance(dyn, int):
        down, up = down[:dyn], up[:, :dyn]
    return down, up, float(net_module.multiplier() * net_module.calc_scale())


def install(
    p: Any,
    args: MultiLoraArgs,
    loaded: list[Any],
    composed: list[Any],
    engine: HookEngine,
    keep_merged: bool,
    step_offset: int,
) -> None:
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
        batched=runs_batched(args.execution, webui_device()),
        warn=lambda message: warn(p, message),
    )
    names = [n.name for n in composed]
    p.multilora_pass = Pass(engine, loaded, static, denoiser, original_inner, wrapper, p.sampler, p.sd_model, names)
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


def finish_pass(p: Any) -> None:
    """Undo :func:`install`; safe to call any number of times, from any callback, after any failure."""
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
    # Put the composed LoRAs back unless the host re-activated networks meanwhile (hires pass, refiner).
    if len(current) == len(static) and all(a is b for a, b in zip(current, static, strict=True)):
        current[:] = state.original_networks
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
            p.multilora_tags = [list(map(str, params.items)) for params in params_list]

        def deactivate(self, p: Any) -> None:
            pass

    return ExtraNetworkMultiLora()


def register_tag_network() -> None:
    from modules import extra_networks

    extra_networks.register_extra_network(tag_network())
