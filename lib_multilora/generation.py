"""What every host does with one generation, on the processing object ``p`` alone (no webui import), and the small
interface a host's glue offers (:class:`Host`: ``hosts.a1111``, ``hosts.forge``, ``hosts.reforge``).

One sampling pass is one sequence for every host (:func:`start_pass`): end what a previous pass left, give the text
encoder back, resolve the composed LoRAs, refuse with a message or plan the pass's deltas, build the hooks, and let
the host install them around its model call. The host answers only what is its own (where its LoRAs live, how they
are merged, how its model is called, how to put things back).

Per-generation state lives on ``p``: the effective args, the tags, the warnings, the pass.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import torch

from . import neighbours, nesting
from .args import MERGE, MIXING, ArgsError, MultiLoraArgs, label_of
from .engine import Delta, HookEngine, LowRank, build_engine
from .inner import MethodInner, runs_batched
from .plan import composite_weights, select
from .schedule import hires_offset, sampling_step
from .spatial import Spatial
from .tags import apply_tags, strip_malformed

log = logging.getLogger("multilora")

#: Every infotext key this extension writes starts with this.
INFOTEXT_PREFIX = "Multi-LoRA"
WARNING_LABEL = "Multi-LoRA warning"
#: The webui's model-type flags (``sd_models.set_model_type``, Forge's loaders) of the UNet architectures the engine
#: covers on every host; a host names the other model types it covers (``Host.covered_models``).
SUPPORTED_MODEL_FLAGS = ("is_sd1", "is_sd2", "is_sdxl")
#: A host that covers no other model type (``Host.covered_models``).
NOTHING_COVERED: Mapping[str, str] = types.MappingProxyType({})


@dataclass
class Resolved:
    """What a pass composes: the effective args, the host's loaded LoRAs, the composed ones (in order) and how many
    times each is loaded (A1111 merges one entry per mention)."""

    args: MultiLoraArgs
    loaded: list[Any]
    composed: list[Any]
    counts: list[int]


@dataclass
class Plan:
    """A host's answer for a pass: per UNet layer, each composed LoRA's delta (LoRA k = index k); whether the host's
    merge of plain LoRAs is exact enough for a hook to subtract it again (not into fp8 weights); what to tell the
    user."""

    deltas: dict[torch.nn.Module, dict[int, Delta]]
    exact_merge: bool
    warnings: list[str] = field(default_factory=list)


class Host(Protocol):
    """What a webui's glue answers; the sequence around it is :func:`start_pass` and
    :func:`apply_text_encoder_policy`. ``refusal`` says, without building anything, why the host cannot compose a
    pass (the text-encoder policy asks it before the conds are computed); ``plan`` builds the pass's deltas (and may
    still refuse: a LoRA it turns out it cannot express). ``finish_pass`` is idempotent and called from every callback
    that may come last."""

    #: A LoRA written twice in the prompt is merged twice (A1111, reForge), not once (Forge).
    merges_each_mention: bool
    #: The class names of the webui's model objects, besides SD1, SD2 and SDXL (:data:`SUPPORTED_MODEL_FLAGS`), whose
    #: LoRA layers the host's glue covers exactly, each with the name users know it by (Forge: ``StableDiffusion3``:
    #: ``SD3``), which a refusal lists.
    covered_models: Mapping[str, str]

    def loaded_networks(self) -> list[Any]: ...

    def device(self) -> torch.device: ...

    def refusal(self, p: Any, resolved: Resolved) -> str | None: ...

    def plan(self, p: Any, resolved: Resolved) -> Plan | str: ...

    def mute_text_encoder(self, p: Any, muted: list[Any]) -> Any: ...

    def unmute_text_encoder(self, p: Any, state: Any) -> None: ...

    def install(self, p: Any, resolved: Resolved, engine: HookEngine, keep_merged: bool, offset: int) -> None: ...

    def finish_pass(self, p: Any) -> None: ...


def begin(p: Any, script_args: tuple, host: Host) -> None:
    """Once per generation, from the script's ``process``: wrap ``p``'s methods for ``host`` (:func:`adopt`), end a
    pass left over on this ``p``, read the args. A pass nested in a generation (:mod:`nesting`: ADetailer's) runs
    with that generation's X/Y/Z cell and tells it its warnings; a copy of an adopted ``p`` is no nested pass."""
    owner = vars(p).get("multilora_owner")
    outer = nesting.enclosing(p) if owner is None or owner is p else None  # by identity: p's class compares fields
    adopt(p, {"close": partial(close_generation, host), "calculate_hr_conds": partial(before_hires_conds, host)})
    host.finish_pass(p)
    if outer is not None:
        p.multilora_enclosing = outer
    read_args(p, script_args)
    nesting.link(p)


def end(p: Any, host: Host) -> None:
    """From the script's ``postprocess`` (also called by ADetailer on copies of ``p``, before its passes): the pass
    is over; the generation's link only once it is really over (a copy's params are the generation's)."""
    host.finish_pass(p)
    if vars(p).get("multilora_owner") is p:
        nesting.unlink(p)


def close_generation(host: Host, p: Any) -> None:
    """``p.close`` runs whatever happened (exceptions included): nothing of ours may outlive it."""
    try:
        host.finish_pass(p)
    finally:
        restore_text_encoder(p, host)
        nesting.unlink(p)


def note_nested_pass(p: Any) -> None:
    """From every extra-network activation (the webui activates ours in every pass, nested ones included): a pass
    nested in a generation that runs a method, made without Multi-LoRA, is said in that generation's infotext."""
    if "multilora_owner" in vars(p):  # Multi-LoRA runs in this pass (or in the one it is a copy of)
        return
    outer = nesting.enclosing(p)
    if outer is not None and outer.extra_generation_params.get(label_of("method"), MERGE) != MERGE:
        warn(outer, neighbours.ran_without_us(p))


def before_hires_conds(host: Host, p: Any) -> None:
    """The webui computes the hires conds after re-activating the LoRAs for the hires pass (or during the first
    pass's setup, with "use the first pass's conds"): they get the text-encoder policy too, except when the hires pass
    runs merged (hires mode Off)."""
    try:
        resolved = resolve(p, host)
        if resolved is not None and resolved.args.hires == "Off":
            restore_text_encoder(p, host)
        else:
            apply_text_encoder_policy(p, host)
    except Exception as e:  # never break the generation: plain conds, said out loud
        restore_text_encoder(p, host)
        warn(p, f"internal error in the text-encoder policy for the hires pass, using All: {e!r}")


def read_args(p: Any, script_args: tuple) -> None:
    """The panel/API args, prompt-tag clean-up and X/Y/Z overrides onto ``p``; problems are said, never raised."""
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
    cell = vars(p).get("multilora_enclosing", p)  # a nested pass runs as its generation's X/Y/Z cell says
    override = getattr(cell, "multilora_override", None)  # set by X/Y/Z axes
    if override:
        try:
            p.multilora_args = MultiLoraArgs.from_dict({**vars(p.multilora_args), **override})
        except ArgsError as e:
            warn(p, f"bad X/Y/Z value: {e}")
    if getattr(cell, "multilora_cell_is_merge", False):
        p.extra_generation_params[label_of("method")] = MERGE


#: State a pass leaves on ``p`` (the host's own); a copy of ``p`` must not inherit it.
PASS_STATE = ("multilora_pass", "multilora_muted_te")


def adopt(p: Any, wrappers: dict[str, Callable[[Any], None]]) -> None:
    """Wrap this ``p``'s methods once (:func:`wrap_method`). ``copy(p)`` copies the instance dict, and with it the
    wrappers and pass state of the original: they are dropped and this copy gets its own, so that its cleanup never
    undoes the original's."""
    if vars(p).get("multilora_owner") is p:
        return
    for key in PASS_STATE:
        vars(p).pop(key, None)
    for name, before in wrappers.items():
        wrap_method(p, name, before)
    p.multilora_owner = p


def wrap_method(p: Any, name: str, before: Callable[[Any], None]) -> None:
    """``p.<name>`` as an instance attribute that runs ``before(p)`` first, then the method it replaces (also when
    ``before`` raises). A wrapper copied from another ``p`` is unwrapped and its method rebound to this one. Nothing
    for a ``p`` without that method."""
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


def unwrap_method(p: Any, name: str) -> None:
    """Undo :func:`wrap_method` on ``p`` (nothing if ``p.<name>`` is not this ``p``'s wrapper)."""
    method = vars(p).get(name)
    if getattr(method, "multilora_of", None) is not p:
        return
    wrapped = method.multilora_wrapped
    if getattr(wrapped, "__self__", None) is p and getattr(wrapped, "__func__", None) is getattr(type(p), name, None):
        del vars(p)[name]  # it was the class's own method: no instance attribute left
    else:
        setattr(p, name, wrapped)


def warn(p: Any, message: str) -> None:
    """Tell the user in the infotext and the console, once per generation; never raise. A nested pass's infotext is
    thrown away (ADetailer keeps only its image): its warnings go to its generation's too."""
    warnings = vars(p).setdefault("multilora_warnings", [])
    if message in warnings:
        return
    warnings.append(message)
    text = f"Multi-LoRA: {message}"
    log.warning(text)
    p.comment(text)
    p.extra_generation_params[WARNING_LABEL] = "; ".join(warnings)
    outer = vars(p).get("multilora_enclosing")
    if outer is not None:
        warn(outer, f"{neighbours.nested_pass(p)}: {message}")


def effective_args(p: Any) -> MultiLoraArgs | None:
    """The args the current batch or pass runs with (panel, then tags), or None when disabled or unusable (said)."""
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
    return args


def resolve(p: Any, host: Host) -> Resolved | None:
    """The effective args and, among the host's loaded LoRAs (objects with the built-in's ``name``,
    ``mentioned_name``, ``network_on_disk``), the composed ones; None when nothing is to be composed (disabled, or
    bad input, which is reported). A LoRA written twice where the host merges it twice is composed at that many
    times its weight, and the user is told."""
    args = effective_args(p)
    if args is None:
        return None
    loaded = host.loaded_networks()
    selection = select([(prompt_name(n), network_names(n)) for n in loaded], args.lora_names)
    for w in selection.warnings:
        warn(p, w)
    if selection.error:
        warn(p, selection.error + "; running without Multi-LoRA")
        return None
    resolved = Resolved(args, loaded, [loaded[i] for i in selection.composed], selection.counts)
    for net, count in zip(resolved.composed, resolved.counts, strict=True):
        if count > 1 and host.merges_each_mention:
            warn(
                p,
                f"{prompt_name(net)} appears {count} times in the prompt: the webui merges it {count} times, so it is "
                f"composed as one LoRA at {count}x its weight",
            )
    return resolved


def refusal(p: Any, host: Host, resolved: Resolved) -> str | None:
    """Why this pass must run without Multi-LoRA, known before anything is built: another extension's work it cannot
    follow (:mod:`neighbours`), an architecture the engine does not cover, or the host's own reasons."""
    return (
        neighbours.refusal(p, resolved.args.method)
        or unsupported_model(p.sd_model, host.covered_models)
        or host.refusal(p, resolved)
    )


def unsupported_model(model: Any, covered: Mapping[str, str] = NOTHING_COVERED) -> str | None:
    """SD1, SD2 and SDXL UNets, and the host's ``covered`` model types (class name: the name users know), pass; any
    other architecture has LoRA layers the host may apply in ways the engine does not follow (SD3's joint q/k/v
    projections on A1111), which would be neither switched nor taken out: it is refused by name."""
    if any(getattr(model, flag, False) for flag in SUPPORTED_MODEL_FLAGS) or type(model).__name__ in covered:
        return None
    kind = "SD3" if getattr(model, "is_sd3", False) else type(model).__name__
    names = ["SD1", "SD2", "SDXL", *covered.values()]
    return f"{kind} models are not supported ({', '.join(names[:-1])} and {names[-1]} are)"


def start_pass(p: Any, host: Host) -> None:
    """Install the chosen method for the sampling pass about to run (first pass or hires pass; from
    ``process_before_every_sampling``, which Forge calls twice for a hires pass: the second install replaces the
    first)."""
    host.finish_pass(p)
    restore_text_encoder(p, host)
    resolved = resolve(p, host)
    if resolved is None:
        return
    offset = pass_offset(p, resolved)
    if offset is None:
        return
    plan = refusal(p, host, resolved) or host.plan(p, resolved)
    if isinstance(plan, str):
        warn(p, f"{plan}; running without Multi-LoRA")
        return
    for message in plan.warnings:
        warn(p, message)
    composed = resolved.composed
    untouched = [prompt_name(n) for k, n in enumerate(composed) if not any(k in d for d in plan.deltas.values())]
    if untouched:
        warn(p, f"{', '.join(untouched)} touch no UNet layer (text encoder only?)")
    keep_merged = plan.exact_merge and all(
        isinstance(d, LowRank) for per_layer in plan.deltas.values() for d in per_layer.values()
    )
    spatial = resolved.args.method == "Spatial"
    engine = build_engine(plan.deltas, len(composed), keep_merged, host.device().type == "cuda", base=spatial)
    host.install(p, resolved, engine, keep_merged, offset)


def method_inner(
    p: Any,
    resolved: Resolved,
    engine: HookEngine,
    inner: torch.nn.Module,
    keep_merged: bool,
    offset: int,
    device: torch.device,
    splits: bool = False,
    spatial: Spatial | None = None,
    conflict: Callable[[dict[str, Any]], str | None] | None = None,
) -> MethodInner:
    """The method around ``inner`` (the host's model call) for this pass, counting steps on the sampler's CFG
    denoiser from ``offset``. A Batched Composite runs batched as the args say on ``device``, unless something
    ``splits`` the batch inside the UNet; ``conflict``: why a call's batch may not be replicated (other extensions'
    patches in the UNet)."""
    args, n = resolved.args, len(resolved.composed)
    denoiser = p.sampler.model_wrap_cfg
    return MethodInner(
        inner,
        engine,
        args.method,
        n,
        args.tau,
        step=lambda: offset + sampling_step(denoiser.step, denoiser.total_steps, denoiser.steps),
        observer=getattr(p, "multilora_observer", None),  # set by the test probe
        batched=runs_batched(args.execution, device) and not splits,
        warn=lambda message: warn(p, message),
        weights=pass_weights(p, args, n),
        window=args.window,
        steps=lambda: offset + (denoiser.steps or 0),
        merged=merged_groups(n, keep_merged),
        spatial=spatial,
        conflict=conflict,
    )


def apply_text_encoder_policy(p: Any, host: Host) -> None:
    """Before conds are computed: the text encoder without the composed LoRAs the policy leaves out (the host mutes
    them) and conds cached in lists of this generation's own (the webui caches conds by prompt and network params,
    not by text-encoder weights, in lists every generation shares). Not for a pass that will be refused: that one
    runs as a plain generation, text encoder included."""
    if "multilora_muted_te" in vars(p):
        return
    resolved = resolve(p, host)
    if resolved is None or resolved.args.text_encoder == "All" or refusal(p, host, resolved) is not None:
        return
    keep = resolved.composed[:1] if resolved.args.text_encoder == "First" else []
    muted = [n for n in resolved.composed if all(n is not k for k in keep)]
    p.multilora_muted_te = host.mute_text_encoder(p, muted)
    p.cached_c, p.cached_uc = [None, None], [None, None]
    if hasattr(p, "cached_hr_c"):
        p.cached_hr_c, p.cached_hr_uc = [None, None], [None, None]


def restore_text_encoder(p: Any, host: Host) -> None:
    """Undo :func:`apply_text_encoder_policy`: the host gives the muted LoRAs back and merges them into the text
    encoder again, as a plain generation leaves it."""
    state = vars(p).pop("multilora_muted_te", None)
    if state is not None:
        host.unmute_text_encoder(p, state)


def prompt_name(net: Any) -> str:
    """The name the prompt writes a loaded LoRA by (``<lora:NAME:...>``), which the infotext, the ``LoRAs to compose``
    field and the preview show: another extension may rename ``name`` (LoRA Block Weight appends a random
    ``_in_LBW_0.123`` on A1111), and a name that changes per generation cannot be pasted back."""
    return getattr(net, "mentioned_name", None) or net.name


def network_names(net: Any) -> frozenset[str]:
    """Every name a loaded LoRA answers to (lora-block-weight renames ``name``; users type aliases)."""
    disk = getattr(net, "network_on_disk", None)
    names = {net.name, getattr(net, "mentioned_name", None), getattr(disk, "name", None), getattr(disk, "alias", None)}
    return frozenset(n for n in names if n)


def pass_weights(p: Any, args: MultiLoraArgs, n: int) -> list[float] | None:
    """Composite's (and Spatial's) mixing weights for this pass's ``n`` composed LoRAs (None: the plain mean); a bad
    value is said."""
    if args.method not in MIXING:
        return None
    weights, problem = composite_weights(args.weights, n)
    if problem:
        warn(p, problem)
    return weights


def report_unscheduled(p: Any, wrapper: Any, names: list[str]) -> None:
    """After a pass: name the LoRAs a Switch schedule never reached (more LoRAs than its steps allow)."""
    missed = [names[k] for k in wrapper.unscheduled()]
    if missed:
        warn(p, f"{', '.join(missed)} got no step (more LoRAs than the steps run allow at this switch interval)")


def empty_window(p: Any, args: MultiLoraArgs) -> bool:
    """Whether the step window is empty (``start == end``): then nothing is installed and the image is Merge's,
    bitwise, which the user is told."""
    if args.window is None or args.start != args.end:
        return False
    warn(p, f"the step window {args.start:g}-{args.end:g} is empty: every step runs merged, as Merge")
    return True


def merged_groups(n: int, keep_merged: bool) -> tuple[tuple[int, int, None], ...]:
    """The row groups under which every composed LoRA acts merged: none where the weights hold them all, each one
    over every row where the pass took them out of the weights."""
    return () if keep_merged else tuple((k, 0, None) for k in range(n))


#: The sampler methods a pass runs inside (txt2img's, img2img's and the hires pass's).
SAMPLER_METHODS = ("sample", "sample_img2img")


def pass_offset(p: Any, resolved: Resolved) -> int | None:
    """Where this pass's step count starts (a hires pass continuing the first pass's count starts at its steps), or
    None when the pass runs merged: a hires pass with hires mode Off, or an empty step window (said)."""
    offset = hires_offset(resolved.args.hires, p.steps) if getattr(p, "is_hr_pass", False) else 0
    return None if offset is None or empty_window(p, resolved.args) else offset


def finish_with_sampler(p: Any, sampler: Any, finish: Callable[[Any], None]) -> None:
    """Run ``finish(p)`` when the sampler returns or raises (per-instance wrappers of its sampling methods)."""
    for name in SAMPLER_METHODS:
        method = getattr(sampler, name)

        def run_then_finish(*a: Any, _method: Any = method, **kw: Any) -> Any:
            try:
                return _method(*a, **kw)
            finally:
                finish(p)

        setattr(sampler, name, run_then_finish)


def unwrap_sampler(sampler: Any) -> None:
    """Undo :func:`finish_with_sampler`."""
    for name in SAMPLER_METHODS:
        vars(sampler).pop(name, None)
