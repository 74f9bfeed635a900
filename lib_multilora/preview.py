"""The panel's schedule preview: which LoRA runs at which step, computed from the prompt text alone."""

from __future__ import annotations

import re

from .args import MIXING, MultiLoraArgs
from .plan import composite_weights
from .schedule import describe_schedule, window_steps
from .tags import TAG_NAME, apply_tags

_LORA = re.compile(r"<lora:([^:>]+)[^>]*>")
_TAG = re.compile(rf"<{TAG_NAME}:([^<>]+)>", re.IGNORECASE)


def prompt_loras(prompt: str) -> list[str]:
    """``<lora:name...>`` names in prompt order, each once (the order LoRA Switch cycles in)."""
    return list(dict.fromkeys(m.group(1).strip() for m in _LORA.finditer(prompt)))


def preview_text(prompt: str, steps: int, args: MultiLoraArgs) -> str:
    """One line for the panel: the effective method and, for Switch, the step ranges of each LoRA."""
    args, warnings = apply_tags(args, [m.group(1).split(":") for m in _TAG.finditer(prompt)])
    if not args.enabled:
        return "Off: every <lora> is merged (the webui's normal behaviour)."
    problems = args.problems() + warnings
    if problems:
        return "Will fall back to Merge: " + "; ".join(problems)
    names = prompt_loras(prompt)
    if args.lora_names:
        wanted = {n.lower() for n in args.lora_names}
        names = [n for n in names if n.lower() in wanted]
    if not names:
        return "No <lora> tags to compose in the prompt."
    window = window_steps(args.start, args.end, steps) if args.window else range(steps)
    if args.window and not window:
        return f"Empty step window ({args.start:g}-{args.end:g} of {steps} steps): every step runs merged, as Merge."
    only = f" Steps {window.start}-{window.stop - 1} only; merged outside." if args.window else ""
    if args.method in MIXING:
        weights, problem = composite_weights(args.weights, len(names))
        if weights is None:
            mixed = f"mean of {' | '.join(names)}" + (f" ({problem})" if problem else "")
        else:
            mixed = "weighted mean of " + " | ".join(f"{name} {w:.2f}" for name, w in zip(names, weights, strict=True))
        passes = len(names) if weights is None else sum(w > 0 for w in weights)
        if args.method == "Spatial":
            return (
                f"Spatial Composite, every step: per {args.patch}x{args.patch} latent patch, the LoRAs that move the "
                f"prediction most lead ({mixed} as the prior; {passes + 1} UNet passes per step with the base).{only}"
            )
        return f"Composite, every step: {mixed} ({passes} UNet passes per step).{only}"
    schedule = describe_schedule(len(window), args.tau, names)
    if args.window:  # the schedule starts at the window's first step
        schedule = " | ".join(shift_run(run, window.start) for run in schedule.split(" | "))
    return f"Switch every {args.tau} of {steps} steps: {schedule}{only}"


def shift_run(run: str, offset: int) -> str:
    """``"A: 0-4"`` -> ``"A: 3-7"`` for a schedule that starts at step ``offset``."""
    name, steps = run.rsplit(": ", 1)
    return f"{name}: " + "-".join(str(int(step) + offset) for step in steps.split("-"))
