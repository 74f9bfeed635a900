"""What the Forge host reads off each UNet call without Forge: the cond rows of a call MultiDiffusion stacks from
tiles, and the other extensions' patches a batched Composite call would hand the LoRAs' rows to."""

from __future__ import annotations

import functools
from typing import Any

import torch

from lib_multilora.hosts.patcher import batch_conflict, owner, stacked_cond_rows, unet_patches
from lib_multilora.spatial import chunk_cond_rows


def builtin_function(folder: str, name: str = "patch") -> Any:
    """A function whose code says it was defined in ``extensions-builtin/<folder>/scripts/``, as Forge loads one."""
    namespace: dict[str, Any] = {}
    path = f"/forge/extensions-builtin/{folder}/scripts/{folder}.py"
    exec(compile(f"def {name}(*args):\n    return args[0]\n", path, "exec"), namespace)
    return namespace[name]


def test_tiles_stacked_with_the_calls_rows_in_order_get_its_cond_rows_per_tile() -> None:
    own = chunk_cond_rows([1, 0], 4)  # uncond then cond, two images each
    context = torch.randn(4, 7, 3)
    call = {"c_crossattn": context}
    tiled = {"c_crossattn": context.repeat(3, 1, 1)}
    assert stacked_cond_rows(own, call, tiled, 12).tolist() == [False, False, True, True] * 3
    assert torch.equal(stacked_cond_rows(own, call, call, 4), own)


def test_tiles_in_another_order_or_size_are_not_known() -> None:
    own = chunk_cond_rows([0, 1], 2)
    context = torch.randn(2, 7, 3)
    call = {"c_crossattn": context}
    interleaved = {"c_crossattn": context.repeat_interleave(2, dim=0)}  # [c, c, u, u]: not whole copies of the call
    assert stacked_cond_rows(own, call, interleaved, 4) is None
    assert stacked_cond_rows(own, call, {"c_crossattn": context.repeat(2, 1, 1)}, 5) is None
    assert stacked_cond_rows(None, call, call, 2) is None


def test_batch_conflict_names_every_patch_by_its_extension() -> None:
    sag = builtin_function("sd_forge_sag")
    freeu = builtin_function("sd_forge_freeu")

    class Modifier:
        def __call__(self, h: torch.Tensor, *args: Any) -> torch.Tensor:
            return h

    options = {
        "patches": {"output_block_patch": [freeu]},
        "patches_replace": {"attn1": {("middle", 0, 0): sag}},
        "block_modifiers": [functools.partial(builtin_function("forge_preprocessor_reference"), 1)],
        "block_inner_modifiers": [Modifier()],
        "cond_or_uncond": [0, 1],
    }
    kinds = [kind for kind, _ in unet_patches(options)]
    assert kinds == ["output block patch", "attn1 replacement", "block modifier", "block inner modifier"]
    assert owner(Modifier()) == __name__
    assert batch_conflict({"transformer_options": options}) == (
        "the UNet patches of forge_preprocessor_reference (block modifier); sd_forge_freeu (output block patch); "
        f"sd_forge_sag (attn1 replacement); {__name__} (block inner modifier)"
    )


def test_a_plain_unet_call_has_no_conflict() -> None:
    options = {"cond_or_uncond": [0, 1], "sigmas": torch.ones(1), "patches": {}, "patches_replace": {}}
    assert batch_conflict({"transformer_options": options}) is None
    assert batch_conflict({}) is None
