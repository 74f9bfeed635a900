"""Spatial Composite: each LoRA leads where it moves the prediction most (our definition, after the idea of LoRAtorio,
arXiv 2508.11624, whose code is not public).

Per denoiser call, besides the N single-LoRA outputs ``d_i`` there is a base output ``d_0`` with no composed LoRA
active. On the noise predictions ``eps = (x - d) / sigma`` (in the denoised space every prediction is dominated by the
shared ``x``, so all similarities are ~1), for each cond row and P x P patch ``p``: ``s_ip = cos(eps_i[p], eps_0[p])``
over the patch's C*P*P values and ``W_ip = softmax_i(-s_ip / T)``, a soft minimum: the LoRA that moves the prediction
furthest from the base leads there. ``W`` (times the Composite weights, renormalised) is upsampled to the latent
(nearest) and cond rows get ``sum_i W_i * d_i`` (the same mix in either space: ``x`` is shared and ``W`` sums to 1);
uncond rows get the plain (or weighted) mean. The webui then applies CFG as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Defaults: 8x8 latent patches (64x64 pixels: regions the size of a face or a hand at 512-1024 px, a grid of 8x8 to
#: 16x16 patches) and a temperature at which a LoRA whose cosine to the base is 0.05 lower than another's gets ~2.7x
#: its weight: decisive where the LoRAs disagree, close to the plain mean where they move the prediction alike.
PATCH, TEMPERATURE = 8, 0.05


@dataclass(frozen=True)
class Spatial:
    """Spatial Composite for one pass: its patch size and temperature, and ``cond_rows(rows)``, the host's word on
    which rows of the call about to run are cond rows (None where it cannot tell: the call then runs as Composite)."""

    patch: int
    temperature: float
    cond_rows: Callable[[int], torch.Tensor | None]


def patch_cosines(eps: torch.Tensor, base: torch.Tensor, patch: int) -> torch.Tensor:
    """``cos(eps[r, :, p], base[r, :, p])`` per row and ``patch`` x ``patch`` patch, shape ``[rows, ph, pw]``. Edges
    that do not fill a patch are zero-padded, which changes neither dot products nor norms."""
    rows, channels, height, width = eps.shape
    pad = (0, -width % patch, 0, -height % patch)
    a, b = F.pad(eps, pad), F.pad(base, pad)
    ph, pw = a.shape[2] // patch, a.shape[3] // patch

    def patches(t: torch.Tensor) -> torch.Tensor:  # [rows, ph, pw, C*P*P]
        t = t.reshape(rows, channels, ph, patch, pw, patch)
        return t.permute(0, 2, 4, 1, 3, 5).reshape(rows, ph, pw, -1)

    return F.cosine_similarity(patches(a), patches(b), dim=-1, eps=1e-12)


def spatial_weights(
    eps: list[torch.Tensor], base: torch.Tensor, patch: int, temperature: float, weights: list[float] | None
) -> torch.Tensor:
    """Per-LoRA, per-pixel mixing weights ``[N, rows, 1, H, W]`` (summing to 1 over the LoRAs)."""
    similarity = torch.stack([patch_cosines(e, base, patch) for e in eps])  # [N, rows, ph, pw]
    logits = -similarity / temperature
    if weights is not None:  # Composite weights multiply W before renormalising: add their logs
        prior = torch.tensor(weights, dtype=logits.dtype, device=logits.device).log()
        logits = logits + prior.view(-1, 1, 1, 1)
    mix = torch.softmax(logits, dim=0)
    height, width = base.shape[2:]
    mix = mix.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)[:, :, :height, :width]
    return mix.unsqueeze(2)


def spatial_mix(
    denoised: list[torch.Tensor],
    base: torch.Tensor,
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond_rows: torch.Tensor,
    patch: int = PATCH,
    temperature: float = TEMPERATURE,
    weights: list[float] | None = None,
) -> torch.Tensor:
    """The Spatial Composite output of one denoiser call from the single-LoRA denoised outputs, the base output, the
    call's input ``x`` and per-row ``sigma``; ``cond_rows`` (bool, one per row) says which rows get the spatial mix,
    the others get the (weighted) mean. fp32 inside, returned in the outputs' dtype."""
    ds = [d.float() for d in denoised]
    scale = sigma.float().reshape(-1, 1, 1, 1)
    eps = [(x.float() - d) / scale for d in ds]
    eps_base = (x.float() - base.float()) / scale
    mix = spatial_weights(eps, eps_base, patch, temperature, weights)  # [N, rows, 1, H, W]
    flat = torch.tensor(weights if weights is not None else [1 / len(ds)] * len(ds), device=x.device)
    plain = flat.view(-1, 1, 1, 1, 1).expand_as(mix)
    mix = torch.where(cond_rows.view(1, -1, 1, 1, 1).to(x.device), mix, plain)
    out = sum(m * d for m, d in zip(mix, ds, strict=True))
    return out.to(denoised[0].dtype)


class StackedCondRows:
    """``Spatial.cond_rows`` for a denoiser that stacks its cond rows first, the uncond rows after, and calls the
    inner model on them in order, whole or in chunks, skipping the uncond rows at times (A1111's ``CFGDenoiser``):
    ``start(n_cond)`` at each denoiser call, then each inner call of ``rows`` rows takes the next ``rows``."""

    def __init__(self) -> None:
        self._n_cond: int | None = None
        self._offset = 0

    def start(self, n_cond: int) -> None:
        self._n_cond, self._offset = n_cond, 0

    def __call__(self, rows: int) -> torch.Tensor | None:
        if self._n_cond is None:
            return None
        index = torch.arange(self._offset, self._offset + rows)
        self._offset += rows
        return index < self._n_cond


def chunk_cond_rows(cond_or_uncond: list[int], rows: int) -> torch.Tensor | None:
    """The cond rows of a call whose rows are equal chunks of the kinds ``cond_or_uncond`` (0 cond, 1 uncond: Forge's
    ``calc_cond_uncond_batch``); None when the rows do not split into them."""
    if not cond_or_uncond or rows % len(cond_or_uncond):
        return None
    kinds = torch.tensor([kind == 0 for kind in cond_or_uncond])
    return kinds.repeat_interleave(rows // len(cond_or_uncond))
