"""Test-only: what both tiers' trace probes share: what they check on a Composite or Spatial call, recomputed from
fresh calls of the wrapper's inner model (unless ``POST /multilora-probe/recompute {"enabled": false}``: those
recomputes are UNet calls of their own, which an extension that keeps a call's state for later, or counts its runs,
would see), and which ``process`` calls start a generation's trace (not under scripts/, so no webui loads it as a
script; the probes load it by its path)."""

from __future__ import annotations

from typing import Any

import torch


def mix_checks(wrapper: Any, active: list[int], call: tuple[tuple, dict], result: torch.Tensor) -> dict[str, Any]:
    """``diff_vs_mean``: the output against the (weighted) mean of fresh single-LoRA outputs; ``spread``: how far the
    first and last of those are apart; for Spatial also ``cond_rows`` and ``diff_vs_spatial`` (the output against
    ``spatial_mix`` recomputed from them and a fresh base output, the engine's LoRA index n: no composed LoRA). Each
    recompute gets its own copy of the call's containers, as the wrapper's own calls do (Forge's UNet consumes its
    ControlNet residuals), and they run in the wrapper's order (the base first), so that an extension that keeps a
    call's state for later (SAG's attention map) keeps what the wrapper's own calls left."""
    from lib_multilora.inner import fresh
    from lib_multilora.spatial import spatial_mix

    a, kw = call
    rows, spatial = wrapper.last_cond_rows, wrapper.spatial
    base = None
    if spatial is not None and rows is not None:
        with wrapper.engine.active([(wrapper._n, 0, None)]):
            base = wrapper.inner(*fresh(a), **fresh(kw)).float()
    singles = []
    for k in active:
        with wrapper.engine.active([(k, 0, None)]):
            singles.append(wrapper.inner(*fresh(a), **fresh(kw)).float())
    weights = None if wrapper.weights is None else [wrapper.weights[k] for k in active]
    mean = (
        torch.stack(singles).mean(0) if weights is None else sum(w * s for w, s in zip(weights, singles, strict=True))
    )
    out: dict[str, Any] = {
        "diff_vs_mean": (mean - result.float()).abs().max().item(),
        "spread": (singles[0] - singles[-1]).abs().max().item(),
    }
    if base is not None:
        expected = spatial_mix(singles, base, a[0], a[1], rows, spatial.patch, spatial.temperature, weights)
        out["cond_rows"] = rows.tolist()
        out["diff_vs_spatial"] = (expected - result.float()).abs().max().item()
    return out


def starts_a_trace(p: Any) -> bool:
    """Whether the probe's ``process`` on ``p`` starts a new trace: not on a copy of a ``p`` it already traced
    (ADetailer calls every script's ``process`` on ``copy(p)`` after its passes, which sample nothing: the trace is
    then still its last pass's)."""
    traced = vars(p).get("multilora_traced")
    if traced is not None and traced is not p:  # by identity: the webui's processing classes compare by fields
        return False
    p.multilora_traced = p
    return True


#: Whether the trace recomputes each Composite/Spatial call (``mix_checks``).
RECOMPUTE = {"enabled": True}


def add_recompute_route(app: Any) -> None:
    """``POST /multilora-probe/recompute {"enabled": bool}``: answers the setting it replaced."""
    from fastapi import Body

    @app.post("/multilora-probe/recompute")
    def recompute(body: dict[str, Any] = Body(...)) -> dict[str, bool]:  # noqa: B008 - FastAPI's idiom
        previous = dict(RECOMPUTE)
        RECOMPUTE["enabled"] = bool(body["enabled"])
        return previous
