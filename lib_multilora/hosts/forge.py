"""Host glue for Stable Diffusion WebUI Forge on its 2024 backend (lllyasviel's, ``main`` of 2025-06; ``backend/``):
the pass is :class:`patcher.PatcherHost`'s, this module answers where Forge keeps a LoRA.

Forge keeps LoRAs as patch sets of a patcher (the UNet's and the text encoder's), ``lora_patches``: a dict keyed by
``(filename, strength_patch, strength_model, online_mode)``, each mapping a parameter key
(``diffusion_model.<ldm path>.weight``) to entries ``[strength, (type, factors), strength_model, offset, function]``
(``backend/patcher/base.py`` ``add_patches``). A LoRA written twice with one weight is one patch set. ``LoraLoader.
refresh`` merges them into the weights in ``sampling_prepare``, after ``process_before_every_sampling``, whenever the
set of patch keys changed (``backend/patcher/lora.py``).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import torch

from ..engine import LowRankDelta
from .patcher import Entries, PatcherHost

#: bitsandbytes and GGUF storage: the weights are quantized tensors, which the engine's dense deltas cannot read as they
#: are (Forge's merge dequantizes them, merges and quantizes again; plain low-rank hooks never read them).
QUANTIZED_STORAGE = ("nf4", "fp4", "gguf")
#: bitsandbytes' 4-bit storage, which only runs on CUDA: the pass is not tested on it.
BITSANDBYTES_STORAGE = ("nf4", "fp4")
#: Forge's "lora" patch factors: (up, down, alpha, mid, dora_scale).
PLAIN_LORA = "lora"


def gguf_classes(patcher: Any) -> set[type]:
    """The GGUF quantization classes of the UNet weights that ``patcher``'s LoRAs patch (none for other storage)."""
    found = set()
    for patches in patcher.lora_patches.values():
        for key in patches:
            path, attribute = key.rsplit(".", 1)
            cls = getattr(getattr(patcher.model.get_submodule(path), attribute, None), "gguf_cls", None)
            if cls is not None:
                found.add(cls)
    return found


def requantizes(cls: type) -> bool:
    """Whether Forge can quantize a merged weight back into this GGUF type (Q8_0, Q5_0, Q4_0: the types that define
    ``quantize_blocks_pytorch``; the K-quants do not, and Forge's merge raises on them)."""
    return "quantize_blocks_pytorch" in vars(cls)


def filename(net: Any) -> str:
    """The file a loaded LoRA came from: Forge keys its patch sets by it (``lora_patches`` key ``[0]``)."""
    return net.network_on_disk.filename


class ForgeHost(PatcherHost):
    """Forge's ``backend/`` patchers."""

    merges_each_mention = False
    #: Forge's Flux engine (``backend/diffusion_engine/flux.py``: FLUX.1-dev and -schnell), Chroma (``chroma.py``,
    #: Flux's blocks without its modulation layers) and SD3/SD3.5 (``sd35.py``, an MMDiT): DiTs whose LoRAs are
    #: patches of their transformer's linears like any UNet's.
    covered_models = MappingProxyType({"Flux": "Flux", "Chroma": "Chroma", "StableDiffusion3": "SD3"})

    def backend_refusal(self, p: Any, patcher: Any) -> str | None:
        """bitsandbytes' nf4/fp4 weights (CUDA only: not tested). Quantized and fp8 weights are composed as fp8 ones
        are: the composed LoRAs taken out of the pass's patcher (merged or online) and added by hooks, which never read
        the weights when the LoRAs are plain (:meth:`opaque_weights` refuses the others)."""
        storage = self.storage_dtype(patcher)
        if storage in BITSANDBYTES_STORAGE:
            return f"UNet weights stored as {storage} (bitsandbytes, which needs CUDA) cannot be composed: not tested"
        unmergeable = sorted({cls.__name__ for cls in gguf_classes(patcher) if not requantizes(cls)})
        if unmergeable and not patcher.has_online_lora():
            # the pass would put the LoRAs back into the weights at its end, as Forge's own merge does: it cannot
            return (
                f"Forge merges no LoRA into {', '.join(unmergeable)} GGUF weights (its 'fp16 LoRA' options apply them "
                "online)"
            )
        return None

    def opaque_weights(self, patcher: Any) -> str | None:
        """GGUF weights are blocks of quantized values; LoRAs applied online (the "fp16 LoRA" options) are merged into
        a copy of the weight in every forward, never into the weights a delta would be computed from."""
        storage = self.storage_dtype(patcher)
        if storage in QUANTIZED_STORAGE:
            return f"stored as {storage}"
        if patcher.has_online_lora():
            return "with LoRAs applied online (Forge's fp16 LoRA option)"
        return None

    def plain_low_rank(self, entry: Any, weight: torch.Tensor) -> LowRankDelta | None:
        """A GGUF weight holds its blocks of quantized values: the factors are matched against a stand-in of the
        weight's own shape (``ParameterGGUF.shape``)."""
        if getattr(weight, "gguf_cls", None) is not None:
            weight = torch.empty(weight.shape, device="meta")
        return super().plain_low_rank(entry, weight)

    def storage_dtype(self, patcher: Any) -> Any:
        return getattr(patcher.model, "storage_dtype", None)

    def entries(self, p: Any, patcher: Any, nets: list[Any]) -> dict[str, Entries]:
        """All patch sets of the nets' files, joined per key."""
        files = {filename(n) for n in nets}
        joined: dict[str, Entries] = {}
        for key, patches in patcher.lora_patches.items():
            if key[0] in files:
                for parameter, entries in patches.items():
                    joined.setdefault(parameter, []).extend(entries)
        return joined

    def strip(self, p: Any, patcher: Any, nets: list[Any]) -> None:
        """Forge merges again when the set of patch keys changes: a dict without the nets' files."""
        files = {filename(n) for n in nets}
        patcher.lora_patches = {key: v for key, v in patcher.lora_patches.items() if key[0] not in files}

    def lora_factors(self, patch: Any) -> tuple[torch.Tensor, torch.Tensor, Any] | None:
        if not (isinstance(patch, tuple) and len(patch) == 2 and patch[0] == PLAIN_LORA):
            return None
        up, down, alpha, mid, dora_scale = patch[1]
        return None if mid is not None or dora_scale is not None else (up, down, alpha)

    def merged(self, entries: Entries, weight: torch.Tensor, key: str) -> torch.Tensor:
        from backend.patcher.lora import merge_lora_to_weight

        return merge_lora_to_weight(entries, weight, key, computation_dtype=torch.float32)

    def remerge(self, patcher: Any) -> None:
        patcher.refresh_loras()
