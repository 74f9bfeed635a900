"""The method wrapper: Switch picks one LoRA per step, Composite averages single-LoRA outputs in fp32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lib_multilora.engine import HookEngine, LowRankDelta
from lib_multilora.inner import MethodInner, composite_mean, fresh, replicate, runs_batched
from lib_multilora.spatial import Spatial, spatial_mix


class Inner(nn.Module):
    """Stand-in for the webui's k-diffusion wrapper: a forward plus attributes callers read."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.sigma_data = 1.0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.lin(x) * sigma[:, None] + cond["c"]

    def get_sigmas(self, n: int) -> torch.Tensor:
        return torch.linspace(1, 0, n)


def setup(n: int = 3) -> tuple[Inner, HookEngine]:
    torch.manual_seed(1)
    inner = Inner()
    eng = HookEngine()
    for k in range(n):
        eng.add(inner.lin, k, LowRankDelta(torch.randn(2, 6), torch.randn(6, 2), 1.0))
    eng.install()
    return inner, eng


def call_args() -> tuple[tuple, dict]:
    return (torch.randn(4, 6), torch.rand(4)), {"cond": {"c": torch.randn(4, 6)}}


def single(inner: Inner, eng: HookEngine, k: int, args: tuple, kwargs: dict) -> torch.Tensor:
    with eng.active([(k, 0, None)]):
        return inner(*args, **kwargs)


def test_composite_is_mean_of_single_lora_outputs() -> None:
    inner, eng = setup(3)
    calls: list[tuple] = []
    wrapped = MethodInner(
        inner, eng, "Composite", 3, 5, step=lambda: 0, observer=lambda s, a, call, out: calls.append((s, a, out))
    )
    args, kwargs = call_args()
    got = wrapped(*args, **kwargs)
    expected = torch.stack([single(inner, eng, k, args, kwargs) for k in range(3)]).mean(0)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert [c[:2] for c in calls] == [(0, [0, 1, 2])] and calls[0][2] is got
    assert eng.groups == ()


def test_composite_then_cfg_equals_paper_formula() -> None:
    inner, eng = setup(2)
    wrapped = MethodInner(inner, eng, "Composite", 2, 5, step=lambda: 0)
    args, kwargs = call_args()  # rows 0-1 cond, rows 2-3 uncond
    out = wrapped(*args, **kwargs)
    s = 7.5
    eps = out[2:] + s * (out[:2] - out[2:])
    singles = [single(inner, eng, k, args, kwargs) for k in range(2)]
    c = torch.stack([o[:2] for o in singles]).mean(0)
    u = torch.stack([o[2:] for o in singles]).mean(0)
    torch.testing.assert_close(eps, u + s * (c - u), atol=1e-5, rtol=1e-5)


def test_switch_follows_step_counter() -> None:
    inner, eng = setup(2)
    step = {"i": 0}
    wrapped = MethodInner(inner, eng, "Switch", 2, 2, step=lambda: step["i"])
    args, kwargs = call_args()
    assert wrapped.used == set()
    for i, k in enumerate([0, 0, 1, 1, 0]):
        step["i"] = i
        assert wrapped.active_loras() == [k]
        torch.testing.assert_close(wrapped(*args, **kwargs), single(inner, eng, k, args, kwargs), atol=0, rtol=0)
    assert wrapped.used == {0, 1}


def test_used_records_loras_that_ran() -> None:
    inner, eng = setup(3)
    wrapped = MethodInner(inner, eng, "Switch", 3, 2, step=lambda: 1)
    args, kwargs = call_args()
    wrapped(*args, **kwargs)
    assert wrapped.used == {0}, "steps 0-1 of tau 2: LoRAs 1 and 2 never ran"
    composite = MethodInner(inner, eng, "Composite", 3, 2, step=lambda: 0)
    composite(*args, **kwargs)
    assert composite.used == {0, 1, 2}


def test_wrapper_forwards_attributes_and_is_a_module() -> None:
    inner, eng = setup(1)
    wrapped = MethodInner(inner, eng, "Composite", 1, 5, step=lambda: 0)
    assert isinstance(wrapped, nn.Module)
    assert wrapped.sigma_data == 1.0 and wrapped.get_sigmas(3).shape == (3,)
    assert wrapped.inner is inner


def test_composite_mean_keeps_dtype_and_accumulates_in_fp32() -> None:
    a = torch.full((2,), 1.0, dtype=torch.float16)
    b = torch.full((2,), 1.0 + 2**-10, dtype=torch.float16)
    out = composite_mean([a, b])
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), ((a.float() + b.float()) / 2).half().float())


class CondInner(nn.Module):
    """An inner model that reads every cond tensor the webui passes, in the SD1 or SDXL layout."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.ctx = nn.Linear(3, 6)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        if "c_crossattn" in cond:  # SD1: {"c_crossattn": [t], "c_concat": [t]}
            context, extra = cond["c_crossattn"][0], cond["c_concat"][0].flatten(1)
        else:  # SDXL: {"crossattn": t, "vector": t, "c_concat": [t]}
            context, extra = cond["crossattn"], cond["vector"] + cond["c_concat"][0].flatten(1)
        return self.lin(x) * sigma[:, None] + self.ctx(context).mean(1) + extra


def cond_setup(n: int) -> tuple[CondInner, HookEngine]:
    torch.manual_seed(2)
    inner = CondInner()
    eng = HookEngine()
    for k in range(n):
        eng.add(inner.lin, k, LowRankDelta(torch.randn(1 + k, 6), torch.randn(6, 1 + k), 0.5 + k))
        if k != 1:
            eng.add(inner.ctx, k, LowRankDelta(torch.randn(2, 3), torch.randn(6, 2), 1.0))
    eng.install()
    return inner, eng


def cond_args(layout: str, rows: int = 4) -> tuple[tuple, dict]:
    x, sigma = torch.randn(rows, 6), torch.rand(rows) + 0.5
    if layout == "sd1":
        cond = {"c_crossattn": [torch.randn(rows, 5, 3)], "c_concat": [torch.randn(rows, 6, 1, 1)]}
    else:
        context, vector = torch.randn(rows, 5, 3), torch.randn(rows, 6)
        cond = {"crossattn": context, "vector": vector, "c_concat": [torch.randn(rows, 6)]}
    return (x, sigma), {"cond": cond}


@pytest.mark.parametrize("layout", ["sd1", "sdxl"])
@pytest.mark.parametrize("n", [2, 3])
def test_batched_composite_equals_sequential(layout: str, n: int) -> None:
    inner, eng = cond_setup(n)
    args, kwargs = cond_args(layout)
    calls: list[int] = []

    def counting_forward(*a: object, _forward=inner.forward, **kw: object) -> torch.Tensor:
        calls.append(a[0].shape[0])
        return _forward(*a, **kw)

    sequential = MethodInner(inner, eng, "Composite", n, 5, step=lambda: 0)(*args, **kwargs)
    inner.forward = counting_forward
    batched = MethodInner(inner, eng, "Composite", n, 5, step=lambda: 0, batched=True)(*args, **kwargs)
    assert calls == [4 * n], "one inner call on the replicated batch"
    torch.testing.assert_close(batched, sequential, atol=1e-5, rtol=1e-5)
    assert eng.groups == ()


def test_replicate_repeats_per_row_tensors_through_nested_conds() -> None:
    (x, sigma), kwargs = cond_args("sdxl", rows=2)
    scalar, other = torch.tensor(3.0), torch.randn(5, 2)
    out = replicate(((x, sigma), {**kwargs, "scale": scalar, "other": other, "name": "n"}), 2, 3)
    (rx, rsigma), rkw = out
    assert rx.shape == (6, 6) and torch.equal(rx[4:], x) and torch.equal(rsigma, sigma.repeat(3))
    assert rkw["cond"]["crossattn"].shape == (6, 5, 3) and isinstance(rkw["cond"]["c_concat"], list)
    assert rkw["cond"]["c_concat"][0].shape == (6, 6) and rkw["cond"]["vector"].shape == (6, 6)
    assert rkw["scale"] is scalar and rkw["other"] is other and rkw["name"] == "n"


class FlakyInner(CondInner):
    """Fails the way a batched call can: out of memory, any other error (Forge's StyleAlign indexing the replicated
    rows with the call's cond/uncond layout), another extension returning other rows, a tuple instead of one tensor,
    or a layer that sees the batch split into tiles (Hypertile's self-attention: ``b`` rows become ``b * tiles``)."""

    def __init__(self, failure: str) -> None:
        super().__init__()
        self.failure = failure

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor | tuple:
        if self.failure == "tiles":  # each row's 6 features as 2 tiles of 3, through a layer that sees 2x the rows
            tiled = self.lin(x.repeat_interleave(2, dim=0))
            return tiled[0::2] * sigma[:, None] + self.ctx(cond["c_crossattn"][0]).mean(1)
        out = super().forward(x, sigma, cond)
        if x.shape[0] > 4 and self.failure == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        if x.shape[0] > 4 and self.failure == "error":
            raise RuntimeError("The size of tensor a (8) must match the size of tensor b (4)")
        if self.failure == "tuple":
            return out, sigma
        return out[:4] if x.shape[0] > 4 and self.failure == "rows" else out


FALLBACK_REASONS = {
    "oom": "out of memory",
    "error": "failed (RuntimeError: The size of tensor a (8) must match",
    "rows": "returned 4 rows for 2x4",
    "tuple": "returned a tuple",
    "tiles": "another number of rows than the 2x4",
}


@pytest.mark.parametrize("failure", list(FALLBACK_REASONS))
def test_batched_falls_back_to_sequential_once_and_says_so(failure: str) -> None:
    torch.manual_seed(3)
    inner = FlakyInner(failure)
    eng = HookEngine()
    for k in range(2):
        eng.add(inner.lin, k, LowRankDelta(torch.randn(2, 6), torch.randn(6, 2), 1.0))
    eng.install()
    warnings: list[str] = []
    wrapped = MethodInner(inner, eng, "Composite", 2, 5, step=lambda: 0, batched=True, warn=warnings.append)
    args, kwargs = cond_args("sd1")
    expected = MethodInner(inner, eng, "Composite", 2, 5, step=lambda: 0)(*args, **kwargs)
    for _ in range(3):
        torch.testing.assert_close(wrapped(*args, **kwargs), expected, atol=0, rtol=0)
    assert not wrapped.batched and len(warnings) == 1
    assert FALLBACK_REASONS[failure] in warnings[0]
    assert eng.groups == ()


def test_batched_falls_back_up_front_on_the_hosts_word() -> None:
    """A call whose patches would take the replicated rows for one call's (the host names them) never runs batched."""
    inner, eng = cond_setup(2)
    args, kwargs = cond_args("sd1")
    rows: list[int] = []
    inner.register_forward_pre_hook(lambda _m, a: rows.append(a[0].shape[0]))
    warnings: list[str] = []
    conflict = "the UNet patches of sd_forge_sag (attn1 replace)"
    wrapped = MethodInner(
        inner, eng, "Composite", 2, 5, step=lambda: 0, batched=True, warn=warnings.append, conflict=lambda kw: conflict
    )
    expected = MethodInner(inner, eng, "Composite", 2, 5, step=lambda: 0)(*args, **kwargs)
    rows.clear()
    torch.testing.assert_close(wrapped(*args, **kwargs), expected, atol=0, rtol=0)
    assert rows == [4, 4] and not wrapped.batched
    assert warnings == [
        f"{conflict} would take the 2x4 rows of batched Composite for one call's; running Composite sequentially"
    ]


class ConsumingInner(CondInner):
    """Consumes per-call state as Forge's UNet does: pops its ControlNet residuals off the ``control`` lists and
    writes into ``transformer_options``."""

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        residuals = cond["control"]["input"]
        out = super().forward(x, sigma, cond)
        while residuals:
            out = out + residuals.pop()
        cond["transformer_options"]["block"] = ("output", 1)
        return out


@pytest.mark.parametrize("n", [1, 3])
def test_every_inner_call_gets_its_own_copy_of_the_calls_state(n: int) -> None:
    """Composite's N calls each see the call's ControlNet residuals, and the caller's state is left as it came."""
    inner, eng = cond_setup(3)
    inner.__class__ = ConsumingInner
    (x, sigma), kwargs = cond_args("sd1")
    residuals = [torch.randn(4, 6), torch.randn(4, 6)]
    kwargs["cond"].update(control={"input": list(residuals)}, transformer_options={})
    expected = torch.stack([single(inner, eng, k, (x, sigma), fresh(kwargs)) for k in range(n)]).mean(0)
    got = MethodInner(inner, eng, "Composite", n, 5, step=lambda: 0)(x, sigma, **kwargs)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    assert kwargs["cond"]["control"]["input"] == residuals and kwargs["cond"]["transformer_options"] == {}


def test_fresh_copies_containers_and_shares_everything_else() -> None:
    tensor, fn = torch.randn(2), print
    value = ({"a": [tensor, (fn, {"b": [1]})]}, [tensor])
    copy = fresh(value)
    assert copy == value and copy is not value and copy[0] is not value[0] and copy[0]["a"] is not value[0]["a"]
    assert copy[0]["a"][1][1]["b"] is not value[0]["a"][1][1]["b"]
    assert copy[0]["a"][0] is tensor and copy[0]["a"][1][0] is fn and copy[1][0] is tensor


class PixelInner(nn.Module):
    """A denoiser-shaped inner model: ``[rows, C, H, W]`` in and out, the LoRA layer over the last dim."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        return self.lin(x) * sigma.view(-1, 1, 1, 1) + cond["c"]


def test_spatial_runs_the_base_first_so_a_composed_lora_runs_last() -> None:
    """An extension that keeps one UNet call's state for later (Forge's SAG its attention map, reference its keys and
    values) keeps the last pass's: under Spatial, as under Composite, a composed LoRA's, never the base's."""
    torch.manual_seed(4)
    inner, eng = PixelInner(), HookEngine()
    for k in range(2):
        eng.add(inner.lin, k, LowRankDelta(torch.randn(2, 6), torch.randn(6, 2), 1.0))
    eng.install()
    order: list[list[int]] = []
    inner.register_forward_pre_hook(lambda _m, _a: order.append([k for k, _, _ in eng.groups]))
    rows = torch.tensor([True, False])
    spatial = Spatial(2, 0.05, lambda n: rows)
    x, sigma, kwargs = torch.randn(2, 4, 2, 6), torch.rand(2) + 0.5, {"cond": {"c": torch.randn(2, 4, 2, 6)}}
    got = MethodInner(inner, eng, "Spatial", 2, 5, step=lambda: 0, spatial=spatial)(x, sigma, **kwargs)
    assert order == [[2], [0], [1]]
    singles = [single(inner, eng, k, (x, sigma), kwargs) for k in range(2)]
    expected = spatial_mix(singles, single(inner, eng, 2, (x, sigma), kwargs), x, sigma, rows, 2, 0.05)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_composite_mean_averages_tuples_and_dicts_element_by_element() -> None:
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    out = composite_mean([(a, {"v": b}), (b, {"v": a})])
    torch.testing.assert_close(out[0], (a + b) / 2)
    torch.testing.assert_close(out[1]["v"], (a + b) / 2)
    assert isinstance(out, tuple) and isinstance(out[1], dict)


def test_switch_ignores_batched_and_auto_batches_on_cuda_only() -> None:
    inner, eng = cond_setup(2)
    args, kwargs = cond_args("sd1")
    wrapped = MethodInner(inner, eng, "Switch", 2, 1, step=lambda: 1, batched=True)
    with eng.active([(1, 0, None)]):
        expected = inner(*args, **kwargs)
    torch.testing.assert_close(wrapped(*args, **kwargs), expected, atol=0, rtol=0)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert [runs_batched(e, cpu) for e in ("Sequential", "Batched", "Auto")] == [False, True, False]
    assert [runs_batched(e, cuda) for e in ("Sequential", "Batched", "Auto")] == [False, True, True]


@pytest.mark.parametrize("batched", [False, True])
def test_weighted_composite_is_the_weighted_mean_and_skips_weight_zero(batched: bool) -> None:
    inner, eng = cond_setup(3)
    args, kwargs = cond_args("sd1")
    singles = []
    for k in range(3):
        with eng.active([(k, 0, None)]):
            singles.append(inner(*args, **kwargs))
    weights = [0.5, 0.0, 0.5]
    calls: list[list[int]] = []
    wrapped = MethodInner(
        inner,
        eng,
        "Composite",
        3,
        5,
        step=lambda: 0,
        batched=batched,
        weights=weights,
        observer=lambda s, active, call, out: calls.append(active),
    )
    got = wrapped(*args, **kwargs)
    torch.testing.assert_close(got, 0.5 * singles[0] + 0.5 * singles[2], atol=1e-5, rtol=1e-5)
    assert calls == [[0, 2]], "the weight-0 LoRA is not run"
    only_first = MethodInner(inner, eng, "Composite", 3, 5, step=lambda: 0, batched=batched, weights=[1.0, 0.0, 0.0])
    assert torch.equal(only_first(*args, **kwargs), singles[0]), "one LoRA of weight 1: exactly its output"


@pytest.mark.parametrize("merged", [(), ((0, 0, None), (1, 0, None))])
def test_outside_the_window_every_lora_acts_merged_and_switch_starts_at_the_window(merged: tuple) -> None:
    inner, eng = cond_setup(2)
    args, kwargs = cond_args("sd1")
    step = [0]
    calls: list[tuple[int, list[int]]] = []
    wrapped = MethodInner(
        inner,
        eng,
        "Switch",
        2,
        1,
        step=lambda: step[0],
        window=(0.2, 0.6),
        steps=lambda: 10,
        merged=merged,
        observer=lambda s, active, call, out: calls.append((s, active)),
    )
    with eng.active(merged):
        expected_merged = inner(*args, **kwargs)
    for step[0] in range(10):
        out = wrapped(*args, **kwargs)
        if step[0] not in range(2, 6):
            assert torch.equal(out, expected_merged)
    assert calls == [(s, [(s - 2) % 2] if 2 <= s < 6 else []) for s in range(10)]
    assert wrapped.unscheduled() == []
