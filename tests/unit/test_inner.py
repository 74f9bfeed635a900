"""The method wrapper: Switch picks one LoRA per step, Composite averages single-LoRA outputs in fp32."""

from __future__ import annotations

import torch
from torch import nn

from lib_multilora.engine import HookEngine, LowRankDelta
from lib_multilora.inner import MethodInner, composite_mean


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
    for i, k in enumerate([0, 0, 1, 1, 0]):
        step["i"] = i
        assert wrapped.active_loras() == [k]
        torch.testing.assert_close(wrapped(*args, **kwargs), single(inner, eng, k, args, kwargs), atol=0, rtol=0)


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
