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

from .engine import HookEngine
from .schedule import switch_index


def composite_mean(outputs: list[torch.Tensor]) -> torch.Tensor:
    """fp32 mean of the per-LoRA outputs, returned in the outputs' dtype."""
    acc = outputs[0].float()
    for out in outputs[1:]:
        acc = acc + out.float()
    return (acc / len(outputs)).to(outputs[0].dtype)


class MethodInner(nn.Module):
    """Stands in for the denoiser's inner model for one sampling pass.

    ``step`` returns the current sampling step (read from the host's counter on every call, so chunked calls and
    second-order samplers stay on the right LoRA). ``observer(step, active, (args, kwargs), result)`` sees every
    call after it ran: the trace the tests and the infotext read.
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
    ) -> None:
        super().__init__()
        self.inner = inner
        self.engine = engine
        self._method, self._n, self._tau = method, n_loras, tau
        self._step, self._observer = step, observer

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def active_loras(self) -> list[int]:
        """Indices of the LoRAs run (one pass each) for the current call."""
        if self._method == "Switch":
            return [switch_index(self._step(), self._tau, self._n)]
        return list(range(self._n))

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = self.active_loras()
        outputs = []
        for k in active:
            with self.engine.active([(k, 0, None)]):
                outputs.append(self.inner(*args, **kwargs))
        result = outputs[0] if len(outputs) == 1 else composite_mean(outputs)
        if self._observer is not None:
            self._observer(self._step(), active, (args, kwargs), result)
        return result
