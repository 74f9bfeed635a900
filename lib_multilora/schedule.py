"""Which LoRA runs when: the step arithmetic of LoRA Switch, kept apart from any host code."""

from __future__ import annotations


def sampling_step(denoiser_step: int, total_calls: int | None, steps: int | None) -> int:
    """Map the webui's denoiser call counter to a sampling step.

    Second-order samplers call the denoiser twice per step; the webui records the expected number of calls
    (``total_calls``) and the user's steps, the same counter that prompt editing uses.
    """
    if not total_calls or not steps:
        return denoiser_step
    return denoiser_step // max(1, total_calls // steps)


def switch_index(step: int, tau: int, n_loras: int) -> int:
    """LoRA Switch: step ``step`` uses LoRA ``(step // tau) % n_loras`` (the paper's cycle, clean form)."""
    if tau <= 0:
        raise ValueError(f"tau must be a positive integer, got {tau}")
    if n_loras <= 0:
        raise ValueError("LoRA Switch needs at least one LoRA")
    return (step // tau) % n_loras


def switch_schedule(steps: int, tau: int, n_loras: int) -> list[int]:
    """The index of the active LoRA at each of ``steps`` steps (used by the preview and the tests)."""
    return [switch_index(i, tau, n_loras) for i in range(steps)]


def describe_schedule(steps: int, tau: int, names: list[str]) -> str:
    """A one-line strip such as ``A: 0-4 | B: 5-9 | A: 10-11`` for the panel preview."""
    if not names or steps <= 0 or tau <= 0:
        return ""
    runs: list[tuple[int, int, int]] = []
    for i, k in enumerate(switch_schedule(steps, tau, len(names))):
        if runs and runs[-1][0] == k:
            runs[-1] = (k, runs[-1][1], i)
        else:
            runs.append((k, i, i))
    return " | ".join(f"{names[k]}: {a}" + (f"-{b}" if b > a else "") for k, a, b in runs)


def window_step(value: float, steps: int) -> int:
    """A window bound as prompt editing writes steps: up to 1 a fraction of ``steps`` (1 is the end), above 1 a step
    number."""
    return round(value * steps) if value <= 1 else int(value)


def window_steps(start: float, end: float, steps: int) -> range:
    """The steps (of ``steps``) a window runs the method in: ``start`` included, ``end`` not."""
    return range(min(window_step(start, steps), steps), min(window_step(end, steps), steps))
