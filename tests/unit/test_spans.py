"""LoRAs on slices of a fused Linear (Flux's ``qkv`` and ``linear1`` under diffusers-format keys) stay low rank and
equal the weight with each slice's ``up @ down`` merged into its rows: alone, summed, as complements of merged
weights, per row group, stacked or not, and as Spatial's base."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lib_multilora.engine import (
    HookEngine,
    LowRankDelta,
    LowRankParts,
    StackedLowRank,
    build_engine,
    complements,
    low_rank_sum,
)

TOL = dict(atol=1e-4, rtol=1e-4)
D_IN, HIDDEN = 8, 6
#: A single block's linear1 as Forge fuses it: q, k, v (HIDDEN each), then the MLP (4 * HIDDEN).
SPANS = [(0, HIDDEN), (HIDDEN, 2 * HIDDEN), (2 * HIDDEN, 3 * HIDDEN), (3 * HIDDEN, 7 * HIDDEN)]
D_OUT = 7 * HIDDEN


def sliced_lora(seed: int, rank: int = 3) -> LowRankParts:
    """A diffusers-format LoRA on the fused layer: one LoRA per slice, each with its own rank-r factors."""
    g = torch.Generator().manual_seed(seed)
    return low_rank_sum(
        [
            LowRankDelta(
                torch.randn(rank, D_IN, generator=g), torch.randn(b - a, rank, generator=g), 0.3 + 0.1 * i, (a, b)
            )
            for i, (a, b) in enumerate(SPANS)
        ]
    )


def fused_lora(seed: int, rank: int = 4) -> LowRankDelta:
    """A kohya-format LoRA on the same layer: one pair of factors over every output feature."""
    g = torch.Generator().manual_seed(seed)
    return LowRankDelta(torch.randn(rank, D_IN, generator=g), torch.randn(D_OUT, rank, generator=g), 0.5)


def dense(delta: LowRankDelta | LowRankParts) -> torch.Tensor:
    """The weight delta the merge adds: each part's ``scale * up @ down`` in its rows."""
    out = torch.zeros(D_OUT, D_IN)
    for part in delta.parts if isinstance(delta, LowRankParts) else (delta,):
        a, b = part.span or (0, D_OUT)
        out[a:b] += part.scale * part.up @ part.down
    return out


def with_weight(lin: nn.Linear, delta: torch.Tensor) -> nn.Linear:
    ref = copy.deepcopy(lin)
    with torch.no_grad():
        ref.weight += delta
    return ref


def test_a_sliced_lora_keeps_its_factors_and_equals_its_slices_merged() -> None:
    lin = nn.Linear(D_IN, D_OUT)
    delta = sliced_lora(1)
    assert isinstance(delta, LowRankParts) and [p.span for p in delta.parts] == SPANS
    factors = sum(p.down.numel() + p.up.numel() for p in delta.parts)
    assert factors == 4 * 3 * D_IN + 3 * D_OUT  # no row of the layer that no slice touches is stored
    x = torch.randn(2, 5, D_IN)
    eng = HookEngine()
    eng.add(lin, 0, delta)
    eng.install()
    with eng.active([(0, 0, None)]):
        got = lin(x)
    torch.testing.assert_close(got, with_weight(lin, dense(delta))(x), **TOL)
    torch.testing.assert_close(delta(lin, x), x @ dense(delta).T, **TOL)
    one = delta.parts[1]  # one slice alone: the rows outside its span get nothing
    torch.testing.assert_close(one(lin, x), x @ dense(one).T, **TOL)
    assert torch.equal(one(lin, x)[..., HIDDEN * 2 :], torch.zeros(2, 5, D_OUT - 2 * HIDDEN))


def test_sums_group_the_parts_by_span() -> None:
    a, b, c = sliced_lora(1), sliced_lora(2, rank=2), fused_lora(3)
    total = low_rank_sum([a, b, c], scale=-1.0)
    assert isinstance(total, LowRankParts)
    assert [(p.span, p.down.shape[0]) for p in total.parts] == [(s, 5) for s in SPANS] + [(None, 4)]
    torch.testing.assert_close(dense(total), -(dense(a) + dense(b) + dense(c)), **TOL)
    same = low_rank_sum([a.parts[0], b.parts[0]])
    assert isinstance(same, LowRankDelta) and same.span == SPANS[0]
    with pytest.raises(ValueError):
        LowRankDelta.concat([a.parts[0], a.parts[1]])


@pytest.mark.parametrize("stack", [False, True])
def test_complements_of_mixed_layouts_on_merged_weights_run_each_lora_alone(stack: bool) -> None:
    """Two diffusers-format LoRAs and a kohya one, all merged into the weight: each one's hook takes the others away,
    one LoRA per call and in row groups (a stack is not built for spans: they run per group)."""
    torch.manual_seed(0)
    lin = nn.Linear(D_IN, D_OUT)
    loras = [sliced_lora(1), fused_lora(2), sliced_lora(3, rank=2)]
    all_merged = with_weight(lin, sum(dense(d) for d in loras))
    eng = HookEngine(stack=stack)
    for k, delta in complements(dict(enumerate(loras)), 3).items():
        eng.add(all_merged, k, delta)
    eng.install()
    x = torch.randn(2, 5, D_IN)
    groups = [(k, 2 * k, 2 * k + 2) for k in range(3)]
    with eng.active(groups):
        batched = all_merged(x.repeat(3, 1, 1))
    assert StackedLowRank.build(all_merged, [eng.deltas[all_merged][k] for k in range(3)]) is None
    for k, lora in enumerate(loras):
        with eng.active([(k, 0, None)]):
            alone = all_merged(x)
        expected = with_weight(lin, dense(lora))(x)
        torch.testing.assert_close(alone, expected, **TOL)
        torch.testing.assert_close(batched[2 * k : 2 * k + 2], expected, **TOL)


def test_spatial_base_takes_every_sliced_lora_away() -> None:
    lin = nn.Linear(D_IN, D_OUT)
    loras = {0: sliced_lora(1), 1: fused_lora(2)}
    all_merged = with_weight(lin, dense(loras[0]) + dense(loras[1]))
    eng = build_engine({all_merged: loras}, 2, keep_merged=True, stack=False, base=True)
    eng.install()
    x = torch.randn(3, D_IN)
    with eng.active([(2, 0, None)]):
        torch.testing.assert_close(all_merged(x), lin(x), **TOL)


class Transposed(nn.Module):
    """A layer whose output is a non-contiguous view of another dtype than its input: the hook cannot write into it
    as one matrix and adds through a temporary."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D_OUT, D_IN, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.weight @ x.double().T).T


def test_outputs_that_are_not_one_matrix_of_the_inputs_dtype_get_the_same_delta() -> None:
    layer = Transposed()
    delta = sliced_lora(4)
    x = torch.randn(5, D_IN)
    eng = HookEngine()
    eng.add(layer, 0, delta)
    eng.install()
    with eng.active([(0, 0, None)]):
        got = layer(x)
    assert not layer(x).is_contiguous() and got.dtype == torch.float64
    expected = x.double() @ (layer.weight + dense(delta).double()).T
    torch.testing.assert_close(got, expected, **TOL)
