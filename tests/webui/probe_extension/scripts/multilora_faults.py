"""Test-only probe: injects a failure into a Multi-LoRA sampling pass and reports live progress, for the
leave-no-trace tests (tests/webui/test_no_trace.py) and bench/soak.py.

Endpoints:
- ``POST /multilora-probe/fail-at {"step": k}``: arm a one-shot fault; the next generation raises ``RuntimeError``
  from inside the pass (the method wrapper's observer) at its first denoiser call of sampling step ``k``.
  ``{"step": null}`` disarms.
- ``GET /multilora-probe/progress``: ``{"generation": n, "calls": c}``: generations started since launch and the
  Multi-LoRA denoiser calls of the current one. Tests poll it to interrupt a pass known to be running: the webui's own
  progress endpoint cannot tell the current generation from the previous one until ``state.begin`` has run.
- ``POST /multilora-probe/pass-start-times``: from now on, times each call of the extension's pass start
  (``generation.start_pass``) and text-encoder policy (``generation.apply_text_encoder_policy``); ``GET``: the
  CPU seconds of each call so far (the calling thread's: other load does not count), per function
  (bench/pass_start.py).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from fastapi import Body
from modules import script_callbacks, scripts

FAULT_MESSAGE = "multilora probe: injected failure"
STATE: dict[str, Any] = {"generation": 0, "calls": 0, "fail_at": None}


class MultiLoraFaultProbe(scripts.Script):
    def title(self) -> str:
        return "multilora fault probe"

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def process(self, p: Any, *args: Any) -> None:
        STATE["generation"] += 1
        STATE["calls"] = 0
        p.multilora_fail_at, STATE["fail_at"] = STATE["fail_at"], None

    def process_batch(self, p: Any, *args: Any, **kwargs: Any) -> None:
        """Wrap whatever observer the other probes set in their ``process`` (all of which ran before this)."""
        inner = getattr(p, "multilora_observer", None)
        if getattr(inner, "counts_calls", False):
            return
        fail_at = getattr(p, "multilora_fail_at", None)

        def observer(step: int, active: list[int], call: tuple[tuple, dict], result: torch.Tensor) -> None:
            if inner is not None:
                inner(step, active, call, result)
            STATE["calls"] += 1
            if step == fail_at:
                raise RuntimeError(f"{FAULT_MESSAGE} at step {step}")

        observer.counts_calls = True  # type: ignore[attr-defined]
        p.multilora_observer = observer


TIMED = ("start_pass", "apply_text_encoder_policy")
TIMES: dict[str, list[float]] = {name: [] for name in TIMED}


def timed(name: str, function: Any) -> Any:
    def run(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            TIMES[name].append(time.thread_time() - start)

    run.multilora_timed = True  # type: ignore[attr-defined]
    return run


def on_app_started(_demo: Any, app: Any) -> None:
    @app.post("/multilora-probe/pass-start-times")
    def start_timing() -> dict[str, list[float]]:
        generation = sys.modules["lib_multilora.generation"]
        for name in TIMED:
            if not getattr(getattr(generation, name), "multilora_timed", False):
                setattr(generation, name, timed(name, getattr(generation, name)))
            TIMES[name].clear()
        return TIMES

    @app.get("/multilora-probe/pass-start-times")
    def times() -> dict[str, list[float]]:
        return TIMES

    @app.post("/multilora-probe/fail-at")
    def fail_at(body: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008 - FastAPI's idiom
        step = body.get("step")
        STATE["fail_at"] = None if step is None else int(step)
        return {"fail_at": STATE["fail_at"]}

    @app.get("/multilora-probe/progress")
    def progress() -> dict[str, int]:
        return {"generation": STATE["generation"], "calls": STATE["calls"]}


script_callbacks.on_app_started(on_app_started)
