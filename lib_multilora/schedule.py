"""Which LoRA runs when: the step arithmetic of the methods, kept apart from any host code. The inner-model wrapper
(:mod:`inner`) runs it and the panel's schedule picture (:mod:`schedule_picture`) draws it, so the two cannot
disagree."""

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


def active_loras(
    step: int,
    steps: int,
    method: str,
    n_loras: int,
    tau: int,
    weights: list[float] | None = None,
    window: tuple[float, float] | None = None,
) -> list[int]:
    """Indices of the LoRAs run (one UNet pass each) at ``step`` of a pass whose count ends at ``steps`` (a hires pass
    that continues the first pass's count includes its offset in both): none outside the ``window`` (every LoRA acts
    merged there); for Switch the one LoRA of the schedule, which starts at the window's first step; for Composite
    and Spatial every LoRA whose weight (``weights``, None: equal) is above 0."""
    first = 0
    if window is not None:
        span = window_steps(*window, steps)
        if step not in span:
            return []
        first = span.start
    if method == "Switch":
        return [switch_index(step - first, tau, n_loras)]
    return [k for k in range(n_loras) if weights is None or weights[k] > 0]


def hires_offset(hires: str, first_pass_steps: int) -> int | None:
    """Where the hires pass's step count starts: at 0 (``Restart``), after the first pass's steps (``Continue``), or
    None: the hires pass runs merged (``Off``)."""
    if hires == "Off":
        return None
    return first_pass_steps if hires == "Continue" else 0
