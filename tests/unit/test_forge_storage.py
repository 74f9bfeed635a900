"""What the Forge host makes of quantized UNet weights without Forge: a GGUF weight's factors matched by its own
shape, which GGUF types Forge can merge a LoRA into (the real-Forge tier runs them: test_flux_quantized.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from lib_multilora.engine import LowRankDelta
from lib_multilora.hosts.forge import ForgeHost, gguf_classes, requantizes


class Quant:
    """Forge's ``packages_3rdparty/gguf`` base class of the quantization types: it cannot quantize."""

    @classmethod
    def quantize_blocks_pytorch(cls, *args: object) -> None:
        raise NotImplementedError


class Q8_0(Quant):
    @classmethod
    def quantize_blocks_pytorch(cls, *args: object) -> None:
        return None


class Q6_K(Quant):
    pass


def lora_entry(out_features: int, in_features: int, rank: int = 2) -> list[object]:
    """A plain LoRA patch entry as Forge's loader makes it: [strength, ("lora", (up, down, alpha, mid, dora)), ...]."""
    up, down = torch.randn(out_features, rank), torch.randn(rank, in_features)
    return [0.5, ("lora", (up, down, float(rank), None, None)), 1.0, None, None]


def test_a_gguf_weight_is_matched_by_its_own_shape_not_its_blocks() -> None:
    packed = torch.zeros(6, 34, dtype=torch.uint8)  # Q8_0 blocks of a 6x32 weight
    gguf = SimpleNamespace(gguf_cls=Q8_0, shape=torch.Size([6, 32]))
    delta = ForgeHost().plain_low_rank(lora_entry(6, 32), gguf)
    assert isinstance(delta, LowRankDelta) and delta.down.shape == (2, 32) and delta.up.shape == (6, 2)
    assert delta.scale == 0.5
    assert ForgeHost().plain_low_rank(lora_entry(6, 32), packed) is None, "blocks are not the weight's shape"


def test_forge_merges_loras_only_into_gguf_types_it_can_quantize_again() -> None:
    assert requantizes(Q8_0) and not requantizes(Q6_K)
    model = nn.Module()
    model.layer = nn.Module()
    model.layer.weight = SimpleNamespace(gguf_cls=Q6_K)
    model.plain = nn.Linear(2, 2)
    patcher = SimpleNamespace(model=model, lora_patches={("a", 1, 1, False): {"layer.weight": [], "plain.weight": []}})
    assert gguf_classes(patcher) == {Q6_K}


def test_bitsandbytes_weights_are_refused_by_name_and_fp8_ones_are_not() -> None:
    def patcher(storage: object) -> SimpleNamespace:
        return SimpleNamespace(
            model=SimpleNamespace(storage_dtype=storage), lora_patches={}, has_online_lora=lambda: False
        )

    said = ForgeHost().backend_refusal(None, patcher("nf4"))
    assert said is not None and "nf4 (bitsandbytes, which needs CUDA)" in said
    assert ForgeHost().backend_refusal(None, patcher(torch.float8_e4m3fn)) is None
    assert ForgeHost().opaque_weights(patcher("gguf")) == "stored as gguf"
    assert ForgeHost().opaque_weights(patcher(torch.float8_e4m3fn)) is None
