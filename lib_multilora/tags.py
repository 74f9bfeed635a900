"""The ``<multilora:...>`` prompt tag: a panel-free way to choose the method, parsed without touching the host.

Grammar (items are what the webui splits on ``:``; ``key=value`` items are named)::

    <multilora:switch>            Switch, the panel's (or default) interval
    <multilora:switch:5>          Switch every 5 steps          (same as tau=5)
    <multilora:composite>         Composite
    <multilora:off>               disable for this prompt
    <multilora:composite:loras=charA,styleC>   compose only these; other <lora> tags stay merged
    <multilora:composite:weights=2,1,1>        Composite with these mixing weights (composed order)
    <multilora:composite:end=0.4>              only in the first 40% of the steps; merged after
    <multilora:switch:3:start=0.2:end=0.8>     a step window: up to 1 a fraction of the steps, above 1 a step
    <multilora:spatial:patch=8:temperature=0.05>   Spatial Composite: each LoRA leads in the patches it moves most

Tags win over the panel. A malformed tag is ignored with a warning; it never raises.
"""

from __future__ import annotations

import re
from dataclasses import replace

from .args import METHODS, MIXING, ArgsError, MultiLoraArgs, canonical_method, to_float, to_int

TAG_NAME = "multilora"

_TAG_START = re.compile(rf"<{TAG_NAME}\b", re.IGNORECASE)
_WELL_FORMED = re.compile(rf"<{TAG_NAME}:[^<>]+>", re.IGNORECASE)
_FRAGMENT = re.compile(rf"<{TAG_NAME}[^<>]*>?", re.IGNORECASE)


def strip_malformed(prompt: str) -> tuple[str, list[str]]:
    """Remove ``<multilora...`` fragments the webui would not recognise as a tag (``<multilora:>``, a missing ``>``)
    and would otherwise feed to the text encoder as words; return the prompt and one warning per fragment."""
    out, warnings, pos = [], [], 0
    for start in _TAG_START.finditer(prompt):
        if start.start() < pos or _WELL_FORMED.match(prompt, start.start()):
            continue
        fragment = _FRAGMENT.match(prompt, start.start())
        out.append(prompt[pos : fragment.start()])
        warnings.append(f"removed malformed tag {fragment.group(0)!r} from the prompt")
        pos = fragment.end()
    out.append(prompt[pos:])
    return "".join(out), warnings


def apply_tags(base: MultiLoraArgs, tags: list[list[str]]) -> tuple[MultiLoraArgs, list[str]]:
    """Apply each tag's items (in prompt order, later tags win) to ``base``; return the result and warnings."""
    args, warnings = base, []
    for items in tags:
        try:
            args = _apply_one(args, items)
        except ArgsError as e:
            warnings.append(f"ignored <{TAG_NAME}:{':'.join(items)}>: {e}")
    return args, warnings


def _apply_one(args: MultiLoraArgs, items: list[str]) -> MultiLoraArgs:
    positional = [i.strip() for i in items if "=" not in i]
    named = dict(i.split("=", 1) for i in items if "=" in i)
    if not positional or not positional[0]:
        raise ArgsError(f"expected a method ({', '.join(m.lower() for m in METHODS)} or off)")
    if len(positional) > 2:
        raise ArgsError("too many items; expected <multilora:METHOD[:TAU]>")
    first = positional[0].lower()
    if first == "off":
        if len(positional) > 1 or named:
            raise ArgsError("<multilora:off> takes no arguments")
        return replace(args, enabled=False)
    method = canonical_method(first)
    if method not in METHODS:
        raise ArgsError(f"unknown method {positional[0]!r}")
    known = ("tau", "loras", "weights", "start", "end", "patch", "temperature")
    unknown = set(named) - set(known)
    if unknown:
        raise ArgsError(f"unknown named item(s) {', '.join(sorted(unknown))}; known: {', '.join(known)}")
    if "weights" in named and method not in MIXING:
        raise ArgsError("weights only apply to composite and spatial")
    if ("patch" in named or "temperature" in named) and method != "Spatial":
        raise ArgsError("patch and temperature only apply to spatial")
    tau_text = named.get("tau", positional[1] if len(positional) > 1 else None)
    if tau_text is not None and method != "Switch":
        raise ArgsError("an interval only applies to switch")
    tau = args.tau if tau_text is None else to_int(tau_text, "tau")
    if tau < 1:
        raise ArgsError(f"tau must be at least 1, got {tau}")
    loras, weights = named.get("loras", args.loras), named.get("weights", args.weights)
    start, end = (to_float(named[k], k) if k in named else getattr(args, k) for k in ("start", "end"))
    if start < 0 or end < 0:
        raise ArgsError(f"a step window bound must be >= 0, got start={start:g}, end={end:g}")
    patch = to_int(named["patch"], "patch") if "patch" in named else args.patch
    temperature = to_float(named["temperature"], "temperature") if "temperature" in named else args.temperature
    return replace(
        args,
        enabled=True,
        method=method,
        tau=tau,
        loras=loras,
        weights=weights,
        start=start,
        end=end,
        patch=patch,
        temperature=temperature,
    )
