"""Which loaded LoRAs a pass composes, decided from names only (no host objects), so every rule is unit-tested."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Selection:
    """Indices into the loaded-LoRA list: ``composed`` run one at a time, the rest stay merged as the webui does.

    ``counts[i]`` is how many times ``composed[i]`` is loaded (written in the prompt): A1111 merges one entry per
    mention, so there a LoRA written twice acts at twice its weight and is composed at that weight."""

    composed: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    #: Requested names that match no loaded LoRA (then ``error`` says so).
    missing: list[str] = field(default_factory=list)


def select(loaded: list[tuple[str, frozenset[str]]], requested: list[str]) -> Selection:
    """Choose the composed LoRAs among ``loaded`` (display name, every name it answers to), in prompt order.

    ``requested`` empty means every loaded LoRA. A requested name that matches nothing is an error (the image would
    silently be wrong otherwise); the same LoRA loaded twice is composed once, counted twice (see :class:`Selection`;
    what a count means is the host's rule).
    """
    out = Selection()
    if not loaded:
        out.error = "no <lora:...> tags in the prompt: nothing to compose"
        return out
    seen: dict[str, int] = {}  # lowered name -> position in composed
    wanted = {n.lower() for n in requested}
    matched: set[str] = set()
    for i, (name, aliases) in enumerate(loaded):
        lowered = {a.lower() for a in aliases} | {name.lower()}
        if wanted and not (lowered & wanted):
            continue
        matched |= lowered & wanted
        if name.lower() in seen:
            out.counts[seen[name.lower()]] += 1
            continue
        seen[name.lower()] = len(out.composed)
        out.composed.append(i)
        out.counts.append(1)
    out.missing = [n for n in requested if n.lower() not in matched]
    if out.missing:
        out.error = f"LoRA(s) to compose not loaded by the prompt: {', '.join(out.missing)}"
        out.composed, out.counts = [], []
        return out
    if len(out.composed) == 1:
        out.warnings.append(f"only one LoRA ({loaded[out.composed[0]][0]}): same result as plain <lora>")
    return out


def composite_weights(text: str, n: int) -> tuple[list[float] | None, str | None]:
    """Composite's mixing weights for ``n`` composed LoRAs from ``"2,1,1"``, normalised to sum 1, and what was wrong
    with ``text`` if anything. None for equal weights: the paper's plain mean, computed exactly as without weights
    (also for a bad value, which the message names)."""
    if not text.strip():
        return None, None
    fallback = "; using equal weights"
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        return None, f"composite weights {text!r} are not comma-separated numbers{fallback}"
    if len(values) != n:
        return None, f"composite weights {text!r}: {len(values)} weight(s) for {n} composed LoRA(s){fallback}"
    if not all(math.isfinite(v) for v in values) or any(v < 0 for v in values):
        return None, f"composite weights {text!r}: each must be a finite number >= 0{fallback}"
    total = sum(values)
    if total == 0:
        return None, f"composite weights {text!r} are all zero{fallback}"
    if len(set(values)) == 1:
        return None, None
    return [v / total for v in values], None
