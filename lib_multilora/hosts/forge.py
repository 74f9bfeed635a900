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

from typing import Any

import torch

from .patcher import Entries, PatcherHost

#: bitsandbytes and GGUF storage: the weights are quantized tensors, which neither Forge's merge arithmetic nor the
#: engine's dense deltas read as they are.
QUANTIZED_STORAGE = ("nf4", "fp4", "gguf")
#: Forge's "lora" patch factors: (up, down, alpha, mid, dora_scale).
PLAIN_LORA = "lora"


def filename(net: Any) -> str:
    """The file a loaded LoRA came from: Forge keys its patch sets by it (``lora_patches`` key ``[0]``)."""
    return net.network_on_disk.filename


class ForgeHost(PatcherHost):
    """Forge's ``backend/`` patchers."""

    merges_each_mention = False
    #: Forge's Flux engine (``backend/diffusion_engine/flux.py``: FLUX.1-dev and -schnell), a DiT whose LoRAs are
    #: patches of its transformer's linears like any UNet's; Chroma and SD3 are not covered yet.
    covered_models = ("Flux",)

    def refusal(self, p: Any, patcher: Any) -> str | None:
        """LoRAs applied online (low-bit weights with an "fp16 LoRA" option: merged in every forward, not into the
        weights) and quantized weights (bnb nf4/fp4, GGUF)."""
        if any(key[3] for key in patcher.lora_patches):
            return "LoRAs applied online (Forge's fp16 LoRA option for low-bit weights) cannot be composed yet"
        storage = self.storage_dtype(patcher)
        if storage in QUANTIZED_STORAGE:
            return f"UNet weights stored as {storage} cannot be composed yet"
        return None

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
