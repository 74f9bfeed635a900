"""Host glue for the Forge family's older backend, ``ldm_patched`` (ComfyUI's ModelPatcher): reForge (Panchovix,
``main`` of 2026-03-11). The pass is :class:`patcher.PatcherHost`'s; this module answers where reForge keeps a LoRA.

A patcher's ``patches`` maps a parameter key (``diffusion_model.<ldm path>.weight``) to entries
``(strength, adapter, strength_model, offset, function)``; a kohya LoRA's adapter is a ``LoRAAdapter`` with
``weights = (up, down, alpha, mid, dora_scale, reshape)`` (``ldm_patched/modules/weight_adapter/lora.py``). No entry
names its file: the built-in Lora extension applies the prompt's LoRAs one by one, each on a clone of the previous
UNet and CLIP patchers (``.parent``), from ``forge_objects_original`` to ``forge_objects_after_applying_lora``, and
writes the list it applied, ``[[file, unet strength, te strength], ...]``, as ``sd_model.current_lora_hash``
(``extensions-builtin/Lora/networks.py``). So a LoRA's entries are the ones its clone added, known by their adapter's
identity: the lists are copied from clone to clone, the adapters are not, and one who rewrites an entry's strength
(LoRA Block Weight's ``lbw=``) keeps its adapter. A LoRA written twice is applied twice.

Weights are merged when sampling is prepared (``model_management.load_models_gpu`` → ``ModelPatcher.partially_load``),
again only when the patcher's ``patches_uuid`` differs from the one merged: a clone whose patches are filtered gets a
new one, and loading the original again merges everything back.
"""

from __future__ import annotations

import ast
import uuid
from typing import Any

import torch

from .. import neighbours
from .patcher import Entries, PatcherHost


class ReforgeHost(PatcherHost):
    """reForge's ``ldm_patched`` patchers."""

    merges_each_mention = True

    def backend_refusal(self, p: Any, patcher: Any) -> str | None:
        """Scaled fp8 checkpoints (their weights are read through a conversion the merge applies, the hooks do not),
        and LoRA patches that cannot be told apart by LoRA (another extension dropped or replaced entries: LoRA Block
        Weight's ``lbw=`` keeps only plain LoRA entries)."""
        if getattr(getattr(patcher.model, "model_config", None), "scaled_fp8", None) is not None:
            return "scaled fp8 checkpoints cannot be composed yet"
        model = p.sd_model
        if applied_entries_of(p) is None or not extends(model.forge_objects_after_applying_lora.unet, patcher):
            changer = f"{neighbours.LBW}'s block weights" if neighbours.lbw_active(p) else "another extension"
            return (
                f"the UNet's LoRA patches were replaced after the built-in applied them ({changer}): they cannot be "
                "told apart by LoRA"
            )
        return None

    def storage_dtype(self, patcher: Any) -> Any:
        return next((param.dtype for param in patcher.model.diffusion_model.parameters()), None)

    def entries(self, p: Any, patcher: Any, nets: list[Any]) -> dict[str, Entries]:
        ids = entry_ids(p, nets)
        found = {key: [e for e in entries if id(e[1]) in ids] for key, entries in patcher.patches.items()}
        return {key: entries for key, entries in found.items() if entries}

    def strip(self, p: Any, patcher: Any, nets: list[Any]) -> None:
        """The nets' entries out of ``patcher``, and a new ``patches_uuid``, so that its next load merges again."""
        ids = entry_ids(p, nets)
        kept = {key: [e for e in entries if id(e[1]) not in ids] for key, entries in patcher.patches.items()}
        patcher.patches = {key: entries for key, entries in kept.items() if entries}
        patcher.patches_uuid = uuid.uuid4()

    def lora_factors(self, patch: Any) -> tuple[torch.Tensor, torch.Tensor, Any] | None:
        from ldm_patched.modules.weight_adapter.lora import LoRAAdapter

        if type(patch) is not LoRAAdapter:
            return None
        up, down, alpha, mid, dora_scale, reshape = patch.weights
        return None if mid is not None or dora_scale is not None or reshape is not None else (up, down, alpha)

    def merged(self, entries: Entries, weight: torch.Tensor, key: str) -> torch.Tensor:
        from ldm_patched.modules.lora import calculate_weight

        return calculate_weight(entries, weight, key, intermediate_dtype=torch.float32)

    def remerge(self, patcher: Any) -> None:
        """Load the patcher as sampling and text encoding do: its LoRAs are merged again if another set is."""
        from ldm_patched.modules import model_management

        model_management.load_models_gpu([patcher])


def entry_ids(p: Any, nets: list[Any]) -> set[int]:
    """The ids of the adapters of the patch entries (UNet and text encoder) the built-in added for the files of
    ``nets``."""
    files = {n.network_on_disk.filename for n in nets}
    return {i for file, ids in applied_entries_of(p) or () if file in files for i in ids}


def applied_entries_of(p: Any) -> list[tuple[str, set[int]]] | None:
    """:func:`applied_entries` of ``p``'s model, walked once for the patcher chains as the built-in left them (a
    pass asks for every composed LoRA, and again to strip them; the text-encoder policy too): kept on ``p`` with what
    the walk read (:func:`chain_state`), walked again when any of that is another object."""
    state = chain_state(p.sd_model)
    kept = vars(p).get("multilora_applied_entries")
    if kept is None or len(kept[0]) != len(state) or any(a is not b for a, b in zip(kept[0], state, strict=False)):
        kept = p.multilora_applied_entries = (state, applied_entries(p.sd_model))
    return kept[1]


def chain_state(model: Any) -> tuple[Any, ...]:
    """What :func:`applied_entries` reads, by identity: the chains' ends, the applied list and the last patchers'
    patch lists (another extension rewrites those after the built-in: LoRA Block Weight puts new lists in place)."""
    after, original = model.forge_objects_after_applying_lora, model.forge_objects_original
    last = (after.unet, after.clip.patcher)
    lists = [entries for patcher in last for entries in patcher.patches.values()]
    return (*last, original.unet, original.clip.patcher, getattr(model, "current_lora_hash", None), *lists)


def applied_entries(model: Any) -> list[tuple[str, set[int]]] | None:
    """Per LoRA the built-in applied (``current_lora_hash``, in order), its file and the ids of the adapters of the
    entries its clones added to the UNet and CLIP patchers; None when the patcher chains do not match that list."""
    try:
        applied = ast.literal_eval(getattr(model, "current_lora_hash", None) or "[]")
    except (ValueError, SyntaxError):
        return None
    # load_lora_for_models clones the patchers for a LoRA unless both its strengths are 0
    files = [file for file, unet, te in applied if unet != 0 or te != 0]
    after, original = model.forge_objects_after_applying_lora, model.forge_objects_original
    chains = [chain(after.unet, original.unet), chain(after.clip.patcher, original.clip.patcher)]
    if any(c is None or len(c) != len(files) + 1 or not all(map(extends, c, c[1:])) for c in chains):
        return None
    return [(file, {i for c in chains for i in added(c[k], c[k + 1])}) for k, file in enumerate(files)]


def chain(top: Any, base: Any) -> list[Any] | None:
    """``base`` and the clones from it down to ``top``, oldest first; None when ``top`` does not descend from it."""
    found = [top]
    while found[-1] is not base:
        parent = getattr(found[-1], "parent", None)
        if parent is None:
            return None
        found.append(parent)
    return found[::-1]


def extends(before: Any, after: Any) -> bool:
    """Whether every patch list of ``after`` starts with ``before``'s entries: the same adapters in the same order
    (their strengths may differ). Clones only append; an extension that dropped or replaced entries breaks it."""
    return all(
        len(after.patches.get(key, ())) >= len(entries)
        and all(a[1] is b[1] for a, b in zip(entries, after.patches[key], strict=False))
        for key, entries in before.patches.items()
    )


def added(before: Any, after: Any) -> set[int]:
    """The ids of the adapters of the entries ``after`` (a clone of ``before``) appended to its patch lists."""
    return {
        id(entry[1]) for key, entries in after.patches.items() for entry in entries[len(before.patches.get(key, ())) :]
    }
