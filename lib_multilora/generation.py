"""What every host does with one generation, on the processing object ``p`` alone (no webui import), and the small
interface a host's glue module offers (:class:`Host`: ``host_a1111``, ``host_forge``).

Per-generation state lives on ``p``: the effective args, the tags, the warnings, the pass.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from .args import MERGE, MIXING, ArgsError, MultiLoraArgs, label_of
from .plan import composite_weights, select
from .tags import apply_tags, strip_malformed

log = logging.getLogger("multilora")

#: Every infotext key this extension writes starts with this.
INFOTEXT_PREFIX = "Multi-LoRA"
WARNING_LABEL = "Multi-LoRA warning"


@dataclass
class Resolved:
    """What a pass composes: the effective args, the host's loaded LoRAs, the composed ones (in order) and how many
    times each is loaded (A1111 merges one entry per mention)."""

    args: MultiLoraArgs
    loaded: list[Any]
    composed: list[Any]
    counts: list[int]


class Host(Protocol):
    """What the entry script needs of a webui's glue. One sampling pass is ``start_pass`` (from
    ``process_before_every_sampling``) ... ``finish_pass`` (idempotent, called from every callback that may come
    last); the text-encoder policy applies before conds are computed and is undone when the pass starts."""

    def resolve(self, p: Any) -> Resolved | None: ...

    def apply_text_encoder_policy(self, p: Any) -> None: ...

    def restore_text_encoder(self, p: Any) -> None: ...

    def start_pass(self, p: Any) -> None: ...

    def finish_pass(self, p: Any) -> None: ...


def begin(p: Any, script_args: tuple, host: Host) -> None:
    """Once per generation, from the script's ``process``: wrap ``p``'s methods for ``host`` (:func:`adopt`), end a
    pass left over on this ``p``, read the args."""
    adopt(p, {"close": partial(close_generation, host), "calculate_hr_conds": partial(before_hires_conds, host)})
    host.finish_pass(p)
    read_args(p, script_args)


def close_generation(host: Host, p: Any) -> None:
    """``p.close`` runs whatever happened (exceptions included): nothing of ours may outlive it."""
    try:
        host.finish_pass(p)
    finally:
        host.restore_text_encoder(p)


def before_hires_conds(host: Host, p: Any) -> None:
    """The webui computes the hires conds after re-activating the LoRAs for the hires pass (or during the first
    pass's setup, with "use the first pass's conds"): they get the text-encoder policy too, except when the hires pass
    runs merged (hires mode Off)."""
    try:
        resolved = host.resolve(p)
        if resolved is not None and resolved.args.hires == "Off":
            host.restore_text_encoder(p)
        else:
            host.apply_text_encoder_policy(p)
    except Exception as e:  # never break the generation: plain conds, said out loud
        host.restore_text_encoder(p)
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
    override = getattr(p, "multilora_override", None)  # set by X/Y/Z axes
    if override:
        try:
            p.multilora_args = MultiLoraArgs.from_dict({**vars(p.multilora_args), **override})
        except ArgsError as e:
            warn(p, f"bad X/Y/Z value: {e}")
    if getattr(p, "multilora_cell_is_merge", False):
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
    """Tell the user in the infotext and the console, once per generation; never raise."""
    warnings = vars(p).setdefault("multilora_warnings", [])
    if message in warnings:
        return
    warnings.append(message)
    text = f"Multi-LoRA: {message}"
    log.warning(text)
    p.comment(text)
    p.extra_generation_params[WARNING_LABEL] = "; ".join(warnings)


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


def resolve(p: Any, loaded: list[Any]) -> Resolved | None:
    """The effective args and, among the host's ``loaded`` LoRAs (objects with the built-in's ``name``,
    ``mentioned_name``, ``network_on_disk``), the composed ones; None when nothing is to be composed (disabled, or
    bad input, which is reported)."""
    args = effective_args(p)
    if args is None:
        return None
    selection = select([(prompt_name(n), network_names(n)) for n in loaded], args.lora_names)
    for w in selection.warnings:
        warn(p, w)
    if selection.error:
        warn(p, selection.error + "; running without Multi-LoRA")
        return None
    return Resolved(args, loaded, [loaded[i] for i in selection.composed], selection.counts)


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
    offset = 0
    if getattr(p, "is_hr_pass", False):
        if resolved.args.hires == "Off":
            return None
        offset = p.steps if resolved.args.hires == "Continue" else 0
    return None if empty_window(p, resolved.args) else offset


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
