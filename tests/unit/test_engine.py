"""The hook engine on real torch layers equals the merged-weight reference (what the webui computes)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lib_multilora.engine import DenseDelta, HookEngine, LowRankDelta, build_engine, complements

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


@pytest.mark.parametrize("mode", ["circular", "reflect"])
def test_conv_deltas_pad_like_the_conv_itself(mode: str) -> None:
    """The webui's tiling makes every conv circular: a zero-padded delta would be wrong at the borders only."""
    conv = nn.Conv2d(4, 8, 3, padding=1, padding_mode=mode)
    low_rank = lora_conv(conv)
    dense = DenseDelta(lambda m: (merged_weight(conv, low_rank), None))
    x = torch.randn(2, 4, 7, 7)
    for d in (low_rank, dense):
        eng = HookEngine()
        eng.add(conv, 0, d)
        eng.install()
        with eng.active([(0, 0, None)]):
            got = conv(x)
        eng.remove()
        expected = merged(conv, low_rank)(x)
        torch.testing.assert_close(got, expected, **TOL)
        torch.testing.assert_close(got[..., 0, :], expected[..., 0, :], **TOL)  # the border row on its own


def test_layer_seeing_other_rows_than_the_groups_adds_nothing_and_says_so() -> None:
    lin = nn.Linear(6, 6)
    eng = HookEngine()
    for k in range(2):
        eng.add(lin, k, lora_linear(6, 6))
    eng.install()
    x = torch.randn(8, 6)
    with eng.active([(0, 0, 2), (1, 2, 4)]):
        assert not eng.misrouted
        torch.testing.assert_close(lin(x), nn.functional.linear(x, lin.weight, lin.bias), atol=0, rtol=0)
        assert eng.misrouted, "8 rows where the groups cover 4: unmappable"
    with eng.active([(0, 0, None)]):
        lin(x)
        assert not eng.misrouted, "one group over every row maps onto any row count"


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


def lora_linear_rank(d_in: int, d_out: int, r: int, scale: float) -> LowRankDelta:
    return LowRankDelta(down=torch.randn(r, d_in), up=torch.randn(d_out, r), scale=scale)


class Block(nn.Module):
    """A UNet-like block: 1x1 conv in, attention-style linears on tokens, a norm, a conv out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.q = nn.Linear(8, 8)
        self.ff = nn.Linear(8, 16)
        self.out = nn.Linear(16, 8)
        self.conv_out = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv_in(x))
        b, c, hh, ww = h.shape
        t = h.flatten(2).transpose(1, 2)  # [B, HW, C]: a non-contiguous view, as in attention blocks
        t = self.out(self.ff(self.q(t)))
        return self.conv_out(t.transpose(1, 2).reshape(b, c, hh, ww))


def block_loras(net: Block, n: int) -> list[dict[nn.Module, object]]:
    """Per LoRA k, its deltas by layer: mixed ranks and scales, LoRA 1 skips ``q``, the last one has a dense (LyCORIS
    style) delta on ``ff`` and a dense norm delta, every one a conv LoRA on ``conv_in``."""
    out: list[dict[nn.Module, object]] = []
    for k in range(n):
        deltas: dict[nn.Module, object] = {
            net.conv_in: lora_conv(net.conv_in, r=2 + k),
            net.out: lora_linear_rank(16, 8, r=2 + 2 * k, scale=0.3 + 0.2 * k),
        }
        if k != 1:
            deltas[net.q] = lora_linear_rank(8, 8, r=3, scale=0.5)
        if k == n - 1:
            dw, dn = torch.randn(16, 8) * 0.1, torch.randn(8) * 0.1
            deltas[net.ff] = DenseDelta(lambda m, dw=dw: (dw, None))
            deltas[net.norm] = DenseDelta(lambda m, dn=dn: (dn, dn))
        else:
            deltas[net.ff] = lora_linear_rank(8, 16, r=4, scale=1.0)
        out.append(deltas)
    return out


def merged_reference(net: Block, deltas: dict[nn.Module, object]) -> Block:
    """The block with one LoRA merged into its weights, as the webui would run it."""
    ref = copy.deepcopy(net)
    names = {m: name for name, m in net.named_modules()}
    with torch.no_grad():
        for module, delta in deltas.items():
            target = getattr(ref, names[module])
            if isinstance(delta, LowRankDelta):
                target.weight += merged_weight(module, delta)
            else:
                dw, db = delta.compute(module)
                target.weight += dw.reshape(target.weight.shape)
                if db is not None:
                    target.bias += db
    return ref


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("stack", [True, False])
def test_batched_groups_equal_sequential_and_merged(n: int, stack: bool) -> None:
    torch.manual_seed(n)
    net = Block()
    loras = block_loras(net, n)
    eng = HookEngine(stack=stack)
    for k, deltas in enumerate(loras):
        for module, delta in deltas.items():
            eng.add(module, k, delta)
    eng.install()
    rows = 2
    x = torch.randn(rows, 4, 5, 5)
    with eng.active([(k, k * rows, (k + 1) * rows) for k in range(n)]):
        batched = net(x.repeat(n, 1, 1, 1))
    for k in range(n):
        with eng.active([(k, 0, None)]):
            sequential = net(x)
        block = batched[k * rows : (k + 1) * rows]
        torch.testing.assert_close(block, sequential, **TOL)
        torch.testing.assert_close(block, merged_reference(net, loras[k])(x), **TOL)
    stacked = {m for (m, _), s in eng._stacks.items() if s is not None}
    # plain Linear LoRAs of at least two groups stack (q has one for n=2); dense deltas and convs do not
    assert stacked == (({net.q} if n > 2 else set()) | {net.out} if stack else set())
    eng.remove()
    assert eng._stacks == {}


def test_stacked_low_rank_pads_ranks_and_fills_missing_groups_with_zeros() -> None:
    lin = nn.Linear(6, 5)
    deltas = [lora_linear_rank(6, 5, 2, 0.5), None, lora_linear_rank(6, 5, 7, 2.0)]
    eng = HookEngine()
    for k, d in enumerate(deltas):
        if d is not None:
            eng.add(lin, k, d)
    eng.install()
    x = torch.randn(3 * 4, 3, 6)
    with eng.active([(k, 4 * k, 4 * k + 4) for k in range(3)]):
        got = lin(x)
    plain = nn.functional.linear(x, lin.weight, lin.bias)
    for k, d in enumerate(deltas):
        rows = slice(4 * k, 4 * k + 4)
        expected = plain[rows] if d is None else merged(lin, d)(x[rows])
        torch.testing.assert_close(got[rows], expected, **TOL)
    (stack,) = eng._stacks.values()
    assert stack.down.shape == (3, 6, 7) and stack.up.shape == (3, 7, 5)
    assert not stack.down[1].any() and not stack.up[1].any()


def test_stacking_needs_equal_blocks_that_cover_the_batch() -> None:
    lin = nn.Linear(4, 4)
    eng = HookEngine()
    eng.add(lin, 0, lora_linear(4, 4))
    eng.add(lin, 1, lora_linear(4, 4))
    eng.install()
    x = torch.randn(5, 4)
    with eng.active([(0, 0, 2), (1, 2, 5)]):  # unequal blocks: the per-group loop
        got = lin(x)
    assert eng._stacks == {}
    torch.testing.assert_close(got[2:], merged(lin, eng.deltas[lin][1])(x[2:]), **TOL)
    with eng.active([(0, 0, 2), (1, 2, 4)]):  # equal blocks, but a layer whose batch is not 2x2 rows
        got = lin(x)
    assert eng._stacks == {}
    torch.testing.assert_close(got[4:], nn.functional.linear(x[4:], lin.weight, lin.bias))


def test_only_touched_layers_are_hooked_and_an_empty_engine_hooks_nothing() -> None:
    net = Block()
    empty = HookEngine()
    empty.install()
    assert not empty.installed
    assert sum(len(m._forward_hooks) for m in net.modules()) == 0
    eng = HookEngine()
    eng.add(net.q, 0, lora_linear(8, 8))
    eng.add(net.q, 1, lora_linear(8, 8))
    eng.add(net.conv_out, 1, LowRankDelta(torch.randn(2, 8, 1, 1), torch.randn(4, 2, 1, 1), 1.0))
    eng.install()
    hooked = {name for name, m in net.named_modules() if m._forward_hooks}
    assert hooked == {"q", "conv_out"}
    eng.remove()
    assert sum(len(m._forward_hooks) for m in net.modules()) == 0


@pytest.mark.parametrize("n", [2, 3])
def test_complements_on_merged_weights_run_each_lora_alone(n: int) -> None:
    """The webui keeps every LoRA merged; LoRA k's complement hook takes the others away again, on Linear and conv
    layers, with mixed ranks and a layer only some LoRAs touch, one LoRA per call and as batched row groups."""
    torch.manual_seed(10 + n)
    net = Block()
    loras = [
        {
            net.conv_in: lora_conv(net.conv_in, r=2 + k),
            net.out: lora_linear_rank(16, 8, r=2 + 2 * k, scale=0.3 + 0.2 * k),
            **({net.q: lora_linear_rank(8, 8, r=3, scale=0.5)} if k != 1 else {}),
        }
        for k in range(n)
    ]
    all_merged = copy.deepcopy(net)
    names = {m: name for name, m in net.named_modules()}
    with torch.no_grad():
        for deltas in loras:
            for module, delta in deltas.items():
                getattr(all_merged, names[module]).weight += merged_weight(module, delta)
    eng = HookEngine()
    for name, module in net.named_modules():
        per_layer = {k: deltas[module] for k, deltas in enumerate(loras) if module in deltas}
        for k, delta in complements(per_layer, n).items():
            eng.add(getattr(all_merged, name), k, delta)
    # q: LoRA 1 has no delta there, so with n=2 only LoRA 1's runs need LoRA 0 taken away
    assert set(eng.deltas[all_merged.q]) == ({1} if n == 2 else {0, 1, 2})
    eng.install()
    x = torch.randn(2, 4, 5, 5)
    with eng.active([(k, 2 * k, 2 * k + 2) for k in range(n)]):
        batched = all_merged(x.repeat(n, 1, 1, 1))
    for k in range(n):
        with eng.active([(k, 0, None)]):
            alone = all_merged(x)
        expected = merged_reference(net, loras[k])(x)
        torch.testing.assert_close(alone, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batched[2 * k : 2 * k + 2], expected, atol=1e-4, rtol=1e-4)


def test_complements_are_views_of_one_stack_of_every_lora() -> None:
    """One copy of the factors per layer whatever N: each complement is the others' rank columns of one negated stack
    (fp16 and fp32 factors promote), and their cast copies are shared too."""
    a, b, c = lora_linear_rank(6, 5, 2, 0.5), lora_linear_rank(6, 5, 3, 2.0), lora_linear_rank(6, 5, 4, -1.0)
    c.down, c.up = c.down.half(), c.up.half()
    comp = complements({0: a, 1: b, 2: c}, 3)
    assert comp[1].down.shape == (9, 6) and comp[1].up.shape == (5, 9) and comp[1].scale == 1.0
    assert [comp[k].ranks for k in range(3)] == [((2, 9),), ((0, 2), (5, 9)), ((0, 5),)]
    assert comp[1].down.dtype == torch.float32
    assert all(comp[k].down is comp[0].down and comp[k]._cache is comp[0]._cache for k in range(3))
    lin = nn.Linear(6, 5)
    x = torch.randn(4, 6)
    torch.testing.assert_close(comp[1](lin, x), -(a(lin, x) + c(lin, x).float()), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(comp[0](lin, x), -(b(lin, x) + c(lin, x).float()), atol=1e-3, rtol=1e-3)
    assert len(comp[0]._cache) == 1  # the views' calls made one cast copy
    alone = complements({0: a}, 3)
    assert alone.keys() == {1, 2}  # only LoRA 0 touches the layer: LoRA 0 alone needs nothing
    assert alone[1].down is a.down and alone[1].up is a.up and alone[1].scale == -a.scale  # one LoRA: no copy
    base = complements({0: a, 1: b}, 2, base=True)[2]  # Spatial's base: minus both
    torch.testing.assert_close(base(lin, x), -(a(lin, x) + b(lin, x)), atol=1e-4, rtol=1e-4)


class OwnLinear(nn.Module):
    """A linear layer that is not an ``nn.Linear`` (Forge's ``ForgeOperations.Linear``)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in))
        self.bias = nn.Parameter(torch.randn(d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


@pytest.mark.parametrize("stack", [False, True])
def test_layers_that_are_linear_without_being_nn_linear(stack: bool) -> None:
    layer, plain = OwnLinear(6, 5), nn.Linear(6, 5)
    with torch.no_grad():
        plain.weight.copy_(layer.weight)
        plain.bias.copy_(layer.bias)
    lows = [lora_linear(6, 5) for _ in range(2)]
    dense = DenseDelta(lambda m: (merged_weight(m, lows[1]), None))
    x = torch.randn(4, 6)
    outputs = []
    for module in (layer, plain):
        eng = HookEngine(stack=stack)
        eng.add(module, 0, lows[0])
        eng.add(module, 1, dense)
        eng.install()
        with eng.active([(0, 0, 2), (1, 2, 4)]):
            outputs.append(module(x))
        eng.remove()
    expected = torch.cat([merged(plain, lows[0])(x[:2]), merged(plain, lows[1])(x[2:])])
    torch.testing.assert_close(outputs[0], expected, **TOL)
    torch.testing.assert_close(outputs[1], expected, **TOL)


def test_the_base_index_runs_no_composed_lora_on_merged_and_on_taken_out_weights() -> None:
    lin = nn.Linear(6, 5)
    lows = [lora_linear(6, 5) for _ in range(2)]
    merged_lin = copy.deepcopy(lin)
    with torch.no_grad():
        merged_lin.weight += merged_weight(lin, lows[0]) + merged_weight(lin, lows[1])
    x = torch.randn(3, 6)
    for module, keep_merged in ((merged_lin, True), (lin, False)):
        eng = build_engine({module: dict(enumerate(lows))}, 2, keep_merged, stack=False, base=True)
        eng.install()
        with eng.active([(2, 0, None)]):
            torch.testing.assert_close(module(x), lin(x), **TOL)
        eng.remove()
