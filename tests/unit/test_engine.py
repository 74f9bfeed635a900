"""The hook engine on real torch layers equals the merged-weight reference (what the webui computes)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lib_multilora.engine import DenseDelta, HookEngine, LowRankDelta

torch.manual_seed(0)
TOL = dict(atol=1e-5, rtol=1e-5)


def lora_linear(d_in: int, d_out: int, r: int = 4) -> LowRankDelta:
    return LowRankDelta(down=torch.randn(r, d_in), up=torch.randn(d_out, r), scale=0.7)


def lora_conv(conv: nn.Conv2d, r: int = 3) -> LowRankDelta:
    return LowRankDelta(
        down=torch.randn(r, conv.in_channels, *conv.kernel_size), up=torch.randn(conv.out_channels, r, 1, 1), scale=0.5
    )


def merged_weight(module: nn.Module, delta: LowRankDelta) -> torch.Tensor:
    """The webui's rebuild_conventional: up @ down (reshaped), times scale."""
    up, down = delta.up.flatten(1), delta.down.flatten(1)
    return (up @ down).reshape(module.weight.shape) * delta.scale


def merged(module: nn.Module, delta: LowRankDelta) -> nn.Module:
    ref = copy.deepcopy(module)
    with torch.no_grad():
        ref.weight += merged_weight(module, delta)
    return ref


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, stride=2)
        self.norm = nn.GroupNorm(4, 8)
        self.proj = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(x))
        return self.proj(h.mean((2, 3)))


def test_linear_lora_equals_merged() -> None:
    lin = nn.Linear(16, 12)
    d = lora_linear(16, 12)
    x = torch.randn(3, 5, 16)
    eng = HookEngine()
    eng.add(lin, 0, d)
    eng.install()
    with eng.active([(0, 0, None)]):
        got = lin(x)
    torch.testing.assert_close(got, merged(lin, d)(x), **TOL)
    assert torch.equal(lin(x), nn.functional.linear(x, lin.weight, lin.bias)), "outside active() nothing is added"


def test_conv_locon_equals_merged_with_stride_and_padding() -> None:
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1)
    d = lora_conv(conv)
    x = torch.randn(2, 4, 9, 9)
    eng = HookEngine()
    eng.add(conv, 0, d)
    eng.install()
    with eng.active([(0, 0, None)]):
        got = conv(x)
    torch.testing.assert_close(got, merged(conv, d)(x), **TOL)


def test_inpainting_conv_uses_first_channels_like_zero_padded_merge() -> None:
    conv = nn.Conv2d(9, 8, 3, padding=1)
    d = LowRankDelta(down=torch.randn(2, 4, 3, 3), up=torch.randn(8, 2, 1, 1), scale=1.0)
    x = torch.randn(1, 9, 6, 6)
    ref = copy.deepcopy(conv)
    with torch.no_grad():
        ref.weight[:, :4] += (d.up.flatten(1) @ d.down.flatten(1)).reshape(8, 4, 3, 3)
    eng = HookEngine()
    eng.add(conv, 0, d)
    eng.install()
    with eng.active([(0, 0, None)]):
        torch.testing.assert_close(conv(x), ref(x), **TOL)


def test_row_groups_apply_each_lora_to_its_rows_only() -> None:
    net = Net()
    deltas = [lora_conv(net.conv), lora_conv(net.conv)]
    lin_deltas = [lora_linear(8, 6), lora_linear(8, 6)]
    eng = HookEngine()
    for k in range(2):
        eng.add(net.conv, k, deltas[k])
        eng.add(net.proj, k, lin_deltas[k])
    eng.install()
    x = torch.randn(4, 4, 8, 8)
    with eng.active([(0, 0, 2), (1, 2, None)]):
        got = net(x)
    for k, rows in ((0, slice(0, 2)), (1, slice(2, 4))):
        ref = copy.deepcopy(net)
        ref.conv, ref.proj = merged(net.conv, deltas[k]), merged(net.proj, lin_deltas[k])
        torch.testing.assert_close(got[rows], ref(x[rows]), **TOL)
    # sequential use of the same engine matches the grouped call
    for k, rows in ((0, slice(0, 2)), (1, slice(2, 4))):
        with eng.active([(k, 0, None)]):
            torch.testing.assert_close(net(x[rows]), got[rows], **TOL)


def test_dense_delta_linear_conv_and_norms_equal_merged() -> None:
    lin, conv, gn, ln = nn.Linear(5, 7), nn.Conv2d(3, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.LayerNorm(5)
    cases = [
        (lin, torch.randn(2, 5), torch.randn(7, 5), torch.randn(7)),
        (conv, torch.randn(2, 3, 5, 5), torch.randn(6, 3, 3, 3), None),
        (gn, torch.randn(2, 6, 4, 4), torch.randn(6), torch.randn(6)),
        (ln, torch.randn(2, 3, 5), torch.randn(5), None),
    ]
    for module, x, dw, db in cases:
        ref = copy.deepcopy(module)
        with torch.no_grad():
            ref.weight += dw
            if db is not None:
                ref.bias += db
        eng = HookEngine()
        seen = []

        def compute(m: nn.Module, dw=dw, db=db, seen=seen) -> tuple[torch.Tensor, torch.Tensor | None]:
            seen.append(m)
            return dw, db

        eng.add(module, 0, DenseDelta(compute))
        eng.install()
        with eng.active([(0, 0, None)]):
            torch.testing.assert_close(module(x), ref(x), **TOL)
            module(x)
        assert seen == [module], "dense delta is computed once, lazily"
        eng.remove()


def test_one_by_one_dense_delta_on_kxk_conv_broadcasts_like_the_merge() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    dw = torch.randn(4, 3, 1, 1)
    ref = copy.deepcopy(conv)
    with torch.no_grad():
        ref.weight += dw
    eng = HookEngine()
    eng.add(conv, 0, DenseDelta(lambda m: (dw, None)))
    eng.install()
    x = torch.randn(1, 3, 5, 5)
    with eng.active([(0, 0, None)]):
        torch.testing.assert_close(conv(x), ref(x), **TOL)


def test_remove_leaves_module_exactly_as_before() -> None:
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 4, 8, 8)
    plain = net(x)
    eng = HookEngine()
    eng.add(net.proj, 0, lora_linear(8, 6))
    eng.install()
    eng.install()  # idempotent
    assert len(net.proj._forward_hooks) == 1
    eng.remove()
    eng.remove()
    assert len(net.proj._forward_hooks) == 0 and eng.groups == ()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(net(x), plain)


def test_unknown_lora_index_and_duplicates() -> None:
    lin = nn.Linear(4, 4)
    eng = HookEngine()
    eng.add(lin, 0, lora_linear(4, 4))
    with pytest.raises(ValueError):
        eng.add(lin, 0, lora_linear(4, 4))
    eng.install()
    x = torch.randn(1, 4)
    with eng.active([(1, 0, None)]):  # LoRA 1 does not touch this layer
        assert torch.equal(lin(x), nn.functional.linear(x, lin.weight, lin.bias))
