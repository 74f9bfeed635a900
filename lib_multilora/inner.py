"""The inner-model wrapper that runs one of the paper's methods around the webui's UNet wrapper.

The webui's CFG denoiser stacks [cond; uncond] rows, calls its inner model, then applies CFG. Because CFG is linear
in the model output, averaging the N single-LoRA outputs row by row before CFG is exactly the paper's
``mean(u_i) + s * (mean(c_i) - mean(u_i))``. Replacing the inner model (never ``CFGDenoiser.forward``) keeps
prompt editing, refiner switches and other extensions' callbacks seeing one call per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .engine import Group, HookEngine
from .schedule import active_loras
from .spatial import Spatial, spatial_mix


def composite_mean(outputs: list[Any], weights: list[float] | None = None) -> Any:
    """fp32 mean of the per-LoRA outputs (weighted by ``weights``, which sum to 1, if given), returned in the outputs'
    dtype; outputs that are tuples, lists or dicts of tensors (an inner model other than the webui's own) are
    averaged element by element."""
    first = outputs[0]
    if isinstance(first, dict):
        return {key: composite_mean([out[key] for out in outputs], weights) for key in first}
    if type(first) in (list, tuple):
        return type(first)(composite_mean(list(parts), weights) for parts in zip(*outputs, strict=True))
    if weights is not None:
        acc = first.float() * weights[0]
        for w, out in zip(weights[1:], outputs[1:], strict=True):
            acc = acc + out.float() * w
        return acc.to(first.dtype)
    acc = first.float()
    for out in outputs[1:]:
        acc = acc + out.float()
    return (acc / len(outputs)).to(first.dtype)


def runs_batched(execution: str, device: torch.device) -> bool:
    """Whether Composite runs its LoRAs as one call on a replicated batch: always for Batched, on a CUDA device for
    Auto (on a CPU the bigger batch buys nothing and costs memory); Sequential is one call per LoRA."""
    return execution == "Batched" or (execution == "Auto" and device.type == "cuda")


def fresh(value: Any) -> Any:
    """``value`` with every dict, list and tuple in it copied, tensors and other objects shared: what one inner-model
    call may consume or mutate (Forge's UNet pops its ControlNet residuals off the ``control`` lists and writes into
    ``transformer_options``) is the host's per-call state, so each of a step's calls gets its own copy of it."""
    if isinstance(value, dict):
        return {key: fresh(v) for key, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(fresh(v) for v in value)
    return value


def replicate(value: Any, rows: int, n: int) -> Any:
    """``value`` with every per-row tensor (dim 0 == ``rows``) repeated ``n`` times along dim 0, through nested
    lists, tuples and dicts: x, sigma and every conditioning tensor, whatever the model type's cond layout."""
    if isinstance(value, torch.Tensor):
        return value.repeat(n, *([1] * (value.dim() - 1))) if value.dim() and value.shape[0] == rows else value
    if isinstance(value, dict):
        return {key: replicate(v, rows, n) for key, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(replicate(v, rows, n) for v in value)
    return value


class MethodInner(nn.Module):
    """Stands in for the denoiser's inner model for one sampling pass.

    ``step`` returns the current sampling step (read from the host's counter on every call, so chunked calls and
    second-order samplers stay on the right LoRA). ``observer(step, active, (args, kwargs), result)`` sees every call
    after it ran: the trace the tests and the infotext read. Each of a call's N inner calls gets its own copy of the
    call's containers (:func:`fresh`). ``batched`` runs Composite as one call on the batch replicated per LoRA; it falls
    back to sequential calls for the rest of the pass, saying why through ``warn``, when that call fails (out of memory
    or any other error), another extension changes the number of rows, or ``conflict(kwargs)``, the host's word on the
    call, names extensions whose patches inside the model would take the replicated batch for one call's rows (attention
    shared or recorded across rows, rows indexed by the call's cond/uncond layout). ``weights`` (Composite, one per
    LoRA, summing to 1; None: the plain mean) weight the mean; a LoRA of weight 0 is not run at all. ``window`` (start,
    end) bounds the steps the method runs in (:func:`window_steps` of ``steps()``, the pass's step count, called on each
    call); outside it the call runs with ``merged`` active, the row groups under which every LoRA acts merged (none
    where the weights hold them all; all of them where the pass took them out), and a Switch schedule starts at the
    window's first step. ``spatial`` (Spatial Composite) also runs the base, first, the engine's LoRA index
    ``n_loras`` (no composed LoRA), and mixes per patch (:func:`spatial.spatial_mix`); the call's ``x`` and ``sigma``
    are its first two args, and its output the denoised prediction.
    """

    def __init__(
        self,
        inner: nn.Module,
        engine: HookEngine,
        method: str,
        n_loras: int,
        tau: int,
        step: Callable[[], int],
        observer: Callable[[int, list[int], tuple[tuple, dict], torch.Tensor], None] | None = None,
        batched: bool = False,
        warn: Callable[[str], None] | None = None,
        weights: list[float] | None = None,
        window: tuple[float, float] | None = None,
        steps: Callable[[], int] | None = None,
        merged: tuple[Group, ...] = (),
        spatial: Spatial | None = None,
        conflict: Callable[[dict], str | None] | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.engine = engine
        self._method, self._n, self._tau = method, n_loras, tau
        self._step, self._observer = step, observer
        self.batched, self._warn = batched, warn
        self.weights = weights
        self._window, self._steps, self._merged = window, steps, merged
        self.spatial = spatial
        self._conflict = conflict
        self.last_cond_rows: torch.Tensor | None = None  # Spatial: the cond rows of the last call (the probe reads it)
        self.used: set[int] = set()  # LoRAs that ran in at least one call

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def active_loras(self) -> list[int]:
        """Indices of the LoRAs run (one pass each) for the current call; none outside the window."""
        steps = self._steps() if self._steps is not None else 0
        window = self._window if self._steps is not None else None
        return active_loras(self._step(), steps, self._method, self._n, self._tau, self.weights, window)

    def unscheduled(self) -> list[int]:
        """The LoRAs a Switch schedule never reached in the calls made so far (none before any call; a Composite LoRA
        of weight 0 is not run by design)."""
        if self._method != "Switch" or not self.used:
            return []
        return [k for k in range(self._n) if k not in self.used]

    def _weights_of(self, active: list[int]) -> list[float] | None:
        return None if self.weights is None else [self.weights[k] for k in active]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        active = self.active_loras()
        self.used.update(active)
        if not active:  # outside the window: every LoRA acts merged, as in a plain generation
            with self.engine.active(self._merged):
                result = self.inner(*args, **kwargs)
        else:
            cond_rows = self.spatial.cond_rows(args[0].shape[0]) if self.spatial is not None else None
            self.last_cond_rows = cond_rows
            if self.spatial is not None and cond_rows is None:
                self._say("which rows are cond rows is not known for this call; running it as Composite")
            # Spatial: the base first, so that a call's last pass is a composed LoRA's, as under Composite (an
            # extension that records one UNet call's state for later, SAG's attention map, reference's keys and
            # values, keeps the last pass's)
            ks = active if cond_rows is None else [self._n, *active]
            outputs = self._outputs(ks, args, kwargs)
            weights = self._weights_of(active)
            if cond_rows is not None:
                result = spatial_mix(
                    outputs[1:],
                    outputs[0],
                    args[0],
                    args[1],
                    cond_rows,
                    self.spatial.patch,
                    self.spatial.temperature,
                    weights,
                )
            else:
                result = outputs[0] if len(outputs) == 1 else composite_mean(outputs, weights)
        if self._observer is not None:
            self._observer(self._step(), active, (args, kwargs), result)
        return result

    def _outputs(self, ks: list[int], args: tuple, kwargs: dict) -> list[Any]:
        """The inner model's output with each of LoRAs ``ks`` alone: one call on the replicated batch (batched, which
        falls back to one call each for the rest of the pass), or one call each."""
        if self.batched and len(ks) > 1:
            outputs = self._batched(ks, args, kwargs)
            if outputs is not None:
                return outputs
        outputs = []
        for k in ks:
            with self.engine.active([(k, 0, None)]):
                outputs.append(self.inner(*fresh(args), **fresh(kwargs)))
        return outputs

    def _batched(self, ks: list[int], args: tuple, kwargs: dict) -> list[torch.Tensor] | None:
        """Each LoRA's output from one call on the replicated batch, or None after falling back to sequential."""
        rows, n = args[0].shape[0], len(ks)
        conflict = self._conflict(kwargs) if self._conflict is not None else None
        if conflict is not None:
            return self._fall_back(f"{conflict} would take the {n}x{rows} rows of batched Composite for one call's")
        failure = None
        try:
            out, misrouted = self._call_replicated(ks, rows, args, kwargs)
        except Exception as e:  # whatever failed, the sequential calls are the reference
            out = misrouted = None  # leave the handler first: its traceback holds the batch's activations
            oom = isinstance(e, torch.cuda.OutOfMemoryError)
            failure = "ran out of memory" if oom else f"failed ({type(e).__name__}: {e})"
        if out is None:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return self._fall_back(f"batched Composite {failure} for {n}x{rows} rows")
        if misrouted:
            return self._fall_back(
                f"a LoRA layer saw another number of rows than the {n}x{rows} of the batch (Hypertile or another "
                "extension splits the batch inside the model)"
            )
        if not isinstance(out, torch.Tensor):
            return self._fall_back(f"the model returned a {type(out).__name__}, not one tensor")
        if out.shape[0] != n * rows:
            return self._fall_back(f"the model returned {out.shape[0]} rows for {n}x{rows} (another extension?)")
        return list(out.split(rows))

    def _call_replicated(self, active: list[int], rows: int, args: tuple, kwargs: dict) -> tuple[Any, bool]:
        """The inner model's output on the batch replicated per LoRA, and whether a hooked layer could not tell the
        LoRAs' rows apart (then the output is wrong and must be discarded)."""
        groups = [(k, i * rows, (i + 1) * rows) for i, k in enumerate(active)]
        with self.engine.active(groups):
            out = self.inner(*replicate(args, rows, len(active)), **replicate(kwargs, rows, len(active)))
            return out, self.engine.misrouted

    def _fall_back(self, reason: str) -> None:
        self.batched = False
        self._say(f"{reason}; running Composite sequentially")

    def _say(self, message: str) -> None:
        if self._warn is not None:
            self._warn(message)
