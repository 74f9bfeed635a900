"""What the Forge backends' pass makes of each kind of patch entry ``(strength, patch, strength_model, offset,
function)``, against a merged-weight reference written after Forge's ``merge_lora_to_weight`` (the real merges of
Forge and reForge: tests/forge/test_patch_math.py): plain LoRAs, LoRAs on slices of a fused weight (diffusers-format
Flux LoRAs) and ``swap_scale_shift`` stay low rank, at the size of their factors; weight scaling and functions that
are no function of the delta's rows fall back to the merge's own dense delta; norm scales are refused by name."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from lib_multilora.engine import DenseDelta, HookEngine, LowRankDelta, LowRankParts
from lib_multilora.generation import Plan, Resolved
from lib_multilora.hosts.forge import ForgeHost

HIDDEN, D_IN, RANK = 6, 6, 3


def identity(t: torch.Tensor) -> torch.Tensor:
    return t


def reference_merge(entries: list[Any], weight: torch.Tensor) -> torch.Tensor:
    """Forge's rule for "lora" patches: narrow to the offset, scale the weight by strength_model, add
    ``function(strength * alpha / rank * up @ down)`` (alpha None: 1)."""
    for strength, (_, (up, down, alpha, _, _)), strength_model, offset, function in entries:
        target = weight if offset is None else weight.narrow(*offset)
        target *= strength_model
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        diff = (up.flatten(1) @ down.flatten(1)).reshape(target.shape)
        target += (function or identity)(strength * scale * diff)
    return weight


class Host(ForgeHost):
    """Forge's patch layout with the reference merge instead of Forge's."""

    def merged(self, entries: list[Any], weight: torch.Tensor, key: str) -> torch.Tensor:
        return reference_merge(entries, weight)


def lora(d_out: int, d_in: int = D_IN, alpha: float | None = 2.0, rank: int = RANK, conv: bool = False) -> tuple:
    """A Forge "lora" patch: ``(up, down, alpha, mid, dora_scale)``."""
    shape = (rank, d_in, 3, 3) if conv else (rank, d_in)
    up = torch.randn(d_out, rank, 1, 1) if conv else torch.randn(d_out, rank)
    return ("lora", (up, torch.randn(*shape), alpha, None, None))


def swap_scale_shift(weight: torch.Tensor) -> torch.Tensor:
    """The function Forge's Flux key map gives ``final_layer.adaLN_modulation.1`` (comfyui_lora_collection/utils)."""
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def hooked_equals_merged(module: nn.Module, entries: list[Any], x: torch.Tensor) -> Any:
    """The delta the pass makes of ``entries``, checked: the hooked layer's output equals the merged layer's."""
    delta = Host().make_delta(module, {"weight": ("diffusion_model.layer.weight", entries)})
    ref = copy.deepcopy(module)
    with torch.no_grad():
        ref.weight.copy_(reference_merge(entries, module.weight.detach().clone()))
    eng = HookEngine()
    eng.add(module, 0, delta)
    eng.install()
    with eng.active([(0, 0, None)]):
        got = module(x)
    eng.remove()
    torch.testing.assert_close(got, ref(x), atol=1e-4, rtol=1e-4)
    return delta


def fused_linear1() -> tuple[nn.Linear, list[Any]]:
    """A single block's ``linear1`` (q, k, v, then the MLP's 4x hidden) and a diffusers-format LoRA's entries on it,
    as Forge's Flux key map makes them: one per slice, ``offset = (0, start, length)``."""
    lin = nn.Linear(D_IN, 7 * HIDDEN)
    offsets = [(0, 0, HIDDEN), (0, HIDDEN, HIDDEN), (0, 2 * HIDDEN, HIDDEN), (0, 3 * HIDDEN, 4 * HIDDEN)]
    return lin, [[0.8, lora(offset[2]), 1.0, offset, None] for offset in offsets]


def test_slices_of_a_fused_weight_stay_low_rank_at_the_size_of_their_factors() -> None:
    torch.manual_seed(0)
    lin, entries = fused_linear1()
    delta = hooked_equals_merged(lin, entries, torch.randn(2, 4, D_IN))
    assert isinstance(delta, LowRankParts)
    assert [p.span for p in delta.parts] == [(0, 6), (6, 12), (12, 18), (18, 42)]
    stored = sum(p.down.numel() + p.up.numel() for p in delta.parts)
    assert stored == sum(e[1][1][0].numel() + e[1][1][1].numel() for e in entries)


def test_a_fused_lora_beside_slices_of_another_file_sums_on_the_layer() -> None:
    torch.manual_seed(1)
    lin, entries = fused_linear1()
    delta = hooked_equals_merged(lin, [[0.5, lora(7 * HIDDEN), 1.0, None, None], *entries], torch.randn(3, D_IN))
    assert isinstance(delta, LowRankParts) and delta.parts[0].span is None


@pytest.mark.parametrize("alpha", [2.0, None])
def test_plain_linear_and_conv_entries_with_or_without_alpha(alpha: float | None) -> None:
    torch.manual_seed(2)
    lin = nn.Linear(D_IN, 5)
    assert isinstance(
        hooked_equals_merged(lin, [[0.7, lora(5, alpha=alpha), 1.0, None, None]], torch.randn(3, D_IN)), LowRankDelta
    )
    conv = nn.Conv2d(D_IN, 4, 3, padding=1)
    delta = hooked_equals_merged(
        conv, [[0.7, lora(4, alpha=alpha, conv=True), 1.0, None, None]], torch.randn(1, D_IN, 5, 5)
    )
    assert isinstance(delta, LowRankDelta) and delta.down.dim() == 4


def test_swap_scale_shift_moves_the_up_rows() -> None:
    torch.manual_seed(3)
    lin = nn.Linear(D_IN, 2 * HIDDEN)
    entry = [1.0, lora(2 * HIDDEN), 1.0, None, swap_scale_shift]
    delta = hooked_equals_merged(lin, [entry], torch.randn(3, D_IN))
    assert isinstance(delta, LowRankDelta)
    torch.testing.assert_close(delta.up, swap_scale_shift(entry[1][1][0]))


@pytest.mark.parametrize(
    "entry",
    [
        [1.0, lora(2 * HIDDEN), 0.5, None, None],  # strength_model scales the base weight: not a low-rank change
        [1.0, lora(2 * HIDDEN), 1.0, None, lambda t: t.flip(1)],  # a function of the delta's columns
        [1.0, lora(2 * HIDDEN), 1.0, None, lambda t: t * t],  # not linear
        [1.0, lora(2 * HIDDEN, d_in=3), 1.0, (1, 0, 3), None],  # a slice of the input features
    ],
    ids=["strength_model", "columns", "nonlinear", "input-slice"],
)
def test_what_is_not_a_plain_delta_is_the_merges_own(entry: list[Any]) -> None:
    torch.manual_seed(4)
    lin = nn.Linear(D_IN, 2 * HIDDEN)
    assert isinstance(hooked_equals_merged(lin, [entry], torch.randn(3, D_IN)), DenseDelta)


def test_patched_norm_scales_are_refused_by_name() -> None:
    """Flux's RMSNorm keeps its parameter as ``scale``: no delta op for it, so the pass is refused naming the keys."""
    model = nn.Module()
    model.qkv = nn.Linear(D_IN, 3 * HIDDEN)
    model.query_norm = nn.Module()
    model.query_norm.scale = nn.Parameter(torch.ones(HIDDEN))
    entries = {
        "qkv.weight": [[1.0, lora(3 * HIDDEN), 1.0, None, None]],
        "query_norm.scale": [[1.0, ("diff", (torch.randn(HIDDEN),)), 1.0, None, None]],
    }

    class Patched(Host):
        def backend_refusal(self, p: Any, patcher: Any) -> str | None:
            return None

        def entries(self, p: Any, patcher: Any, nets: list[Any]) -> dict[str, list[Any]]:
            return {key: e for key, e in entries.items() if patcher is unet}

        def storage_dtype(self, patcher: Any) -> Any:
            return torch.float32

    unet = SimpleNamespace(model=model, has_online_lora=lambda: False)
    p = SimpleNamespace(
        sd_model=SimpleNamespace(forge_objects=SimpleNamespace(unet=unet, clip=SimpleNamespace(patcher=None)))
    )
    resolved = Resolved(args=None, loaded=[], composed=[object()], counts=[1])
    assert Patched().refusal(p, resolved) == "the composed LoRAs patch query_norm.scale, which the hooks cannot apply"
    del entries["query_norm.scale"]
    assert Patched().refusal(p, resolved) is None
    assert isinstance(Patched().plan(p, resolved), Plan)
