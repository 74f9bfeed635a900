"""The panel's preview: what a generation with the current prompt and panel would compose, read from the prompt text
alone with the rules the run applies (the prompt's tags, the selection of the LoRAs to compose, the weights), and
one line that says it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .args import MIXING, MultiLoraArgs, join_names, split_names
from .plan import composite_weights, select
from .schedule import describe_schedule, window_steps
from .tags import TAG_NAME, apply_tags

_LORA = re.compile(r"<lora:([^:>]+)[^>]*>")
_TAG = re.compile(rf"<{TAG_NAME}:([^<>]+)>", re.IGNORECASE)


def prompt_loras(prompt: str) -> list[str]:
    """``<lora:name...>`` names in prompt order, each once (the order LoRA Switch cycles in; the panel's choices)."""
    return list(dict.fromkeys(m.group(1).strip() for m in _LORA.finditer(prompt)))


def picks(prompt: str, names: str) -> list[str]:
    """The panel's picks for the ``LoRAs to compose`` field ``names``: those of its names that are ``<lora>`` tags of
    ``prompt`` (case as the prompt writes them), in prompt order; a name not in the prompt stays in the field only."""
    wanted = {n.lower() for n in split_names(names)}
    return [n for n in prompt_loras(prompt) if n.lower() in wanted]


def names_for(prompt: str, picked: list[str], names: str) -> str:
    """The ``LoRAs to compose`` field after the user picked ``picked`` among ``prompt``'s LoRAs: the picks in prompt
    order, then the names the field held that are not in the prompt (typed by hand or pasted: kept, and the preview
    says so)."""
    chosen = {n.lower() for n in picked}
    in_prompt = prompt_loras(prompt)
    lowered = {n.lower() for n in in_prompt}
    kept = [n for n in split_names(names) if n.lower() not in lowered]
    return join_names([n for n in in_prompt if n.lower() in chosen] + kept)


@dataclass(frozen=True)
class Composition:
    """What a generation would compose: the effective args (the panel, then the prompt's tags), the composed LoRAs in
    order, Composite's normalised weights (None: equal), what the run will warn about, and why it would run as Merge
    instead (``fallback``; then nothing is composed)."""

    args: MultiLoraArgs
    names: tuple[str, ...] = ()
    weights: tuple[float, ...] | None = None
    notes: tuple[str, ...] = ()
    fallback: str | None = None

    @property
    def skipped(self) -> list[str]:
        """The composed LoRAs a weight of 0 leaves out of Composite (no UNet pass of their own)."""
        return [n for n, w in zip(self.names, self.weights or (), strict=False) if w == 0]


def compose(prompt: str, args: MultiLoraArgs) -> Composition:
    """The :class:`Composition` of ``prompt`` with the panel's ``args``."""
    args, warnings = apply_tags(args, [m.group(1).split(":") for m in _TAG.finditer(prompt)])
    if not args.enabled:
        return Composition(args, fallback="Off: every <lora> is merged (the webui's normal behaviour).")
    problems = args.problems() + warnings
    if problems:
        return Composition(args, fallback="Will fall back to Merge: " + "; ".join(problems))
    in_prompt = prompt_loras(prompt)
    if not in_prompt:
        return Composition(args, fallback="No <lora> tags to compose in the prompt.")
    selection = select([(name, frozenset((name,))) for name in in_prompt], args.lora_names)
    if selection.missing:
        missing = ", ".join(selection.missing)
        verb = "is" if len(selection.missing) == 1 else "are"
        why = f"{missing} {verb} not in the prompt (LoRAs to compose are among its <lora> tags)"
        return Composition(args, fallback=f"Will fall back to Merge: {why}.")
    if args.window is not None and args.start == args.end:
        return Composition(
            args, fallback=f"Empty step window ({args.start:g}-{args.end:g}): every step runs merged, as Merge."
        )
    names = tuple(in_prompt[i] for i in selection.composed)
    notes = list(selection.warnings)
    weights = None
    if args.method in MIXING:
        found, problem = composite_weights(args.weights, len(names))
        weights = None if found is None else tuple(found)
        notes += [problem] if problem else []
    return Composition(args, names, weights, tuple(notes))


def preview_text(prompt: str, steps: int, args: MultiLoraArgs) -> str:
    """One line for the panel: the effective method, each composed LoRA with its normalised weight (Composite,
    Spatial) or its step ranges (Switch, first pass), what the run will warn about, or why it would be Merge."""
    composition = compose(prompt, args)
    if composition.fallback:
        return composition.fallback
    args, names = composition.args, list(composition.names)
    window = window_steps(args.start, args.end, steps) if args.window else range(steps)
    if args.window and not window:
        return f"Empty step window ({args.start:g}-{args.end:g} of {steps} steps): every step runs merged, as Merge."
    only = f" Steps {window.start}-{window.stop - 1} only; merged outside." if args.window else ""
    notes = "".join(f" Warning: {note}." for note in composition.notes)
    if args.method in MIXING:
        weights = composition.weights or [1 / len(names)] * len(names)
        kind = "mean" if composition.weights is None else "weighted mean"
        mixed = f"{kind} of " + " | ".join(f"{name} {w:.2f}" for name, w in zip(names, weights, strict=True))
        skipped = composition.skipped
        if skipped:
            mixed += f"; weight 0 skips {', '.join(skipped)}"
        passes = len(names) - len(skipped)
        if args.method == "Spatial":
            return (
                f"Spatial Composite, every step: per {args.patch}x{args.patch} latent patch, the LoRAs that move the "
                f"prediction most lead ({mixed} as the prior; {passes + 1} UNet passes per step with the base)."
                f"{only}{notes}"
            )
        return f"Composite, every step: {mixed} ({passes} UNet passes per step).{only}{notes}"
    schedule = describe_schedule(len(window), args.tau, names)
    if args.window:  # the schedule starts at the window's first step
        schedule = " | ".join(shift_run(run, window.start) for run in schedule.split(" | "))
    return f"Switch every {args.tau} of {steps} steps: {schedule}{only}{notes}"


def shift_run(run: str, offset: int) -> str:
    """``"A: 0-4"`` -> ``"A: 3-7"`` for a schedule that starts at step ``offset``."""
    name, steps = run.rsplit(": ", 1)
    return f"{name}: " + "-".join(str(int(step) + offset) for step in steps.split("-"))
