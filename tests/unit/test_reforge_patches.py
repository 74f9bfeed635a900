"""How reForge's LoRA patches are told apart by LoRA (``hosts.reforge``): its built-in applies each LoRA on a clone
of the previous patchers and names the files only in ``current_lora_hash``. Plain stand-ins for the patchers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lib_multilora.hosts import reforge


def clone(parent: SimpleNamespace, added: dict[str, list[tuple]]) -> SimpleNamespace:
    """As ``load_lora_for_models``: the lists copied, the LoRA's entries appended."""
    patches = {key: entries[:] for key, entries in parent.patches.items()}
    for key, entries in added.items():
        patches.setdefault(key, []).extend(entries)
    return SimpleNamespace(patches=patches, parent=parent)


def adapter(file: str) -> SimpleNamespace:
    """A new adapter, as ``load_lora`` makes one per key for each LoRA it applies."""
    return SimpleNamespace(file=file)


def strengths(entries: dict[str, list[tuple]]) -> dict[str, list[tuple[float, str]]]:
    """Each entry as (strength, its adapter's file)."""
    return {key: [(e[0], e[1].file) for e in found] for key, found in entries.items()}


def model_with(loras: list[tuple[str, float, float]]) -> SimpleNamespace:
    """A model whose built-in applied ``loras`` ([file, unet strength, te strength]); a LoRA with both strengths 0
    gets no clone, as in reForge."""
    unet0, clip0 = SimpleNamespace(patches={}, parent=None), SimpleNamespace(patches={}, parent=None)
    unet, clip = unet0, clip0
    for file, u, t in loras:
        if u == 0 and t == 0:
            continue
        unet = clone(
            unet,
            {"diffusion_model.a.weight": [(u, adapter(file))], f"diffusion_model.{file}.weight": [(u, adapter(file))]},
        )
        clip = clone(clip, {"clip_l.a.weight": [(t, adapter(file))]})
    objects = SimpleNamespace(unet=unet, clip=SimpleNamespace(patcher=clip))
    original = SimpleNamespace(unet=unet0, clip=SimpleNamespace(patcher=clip0))
    return SimpleNamespace(
        current_lora_hash=str([list(x) for x in loras]),
        forge_objects=objects,
        forge_objects_after_applying_lora=objects,
        forge_objects_original=original,
    )


def net(file: str) -> SimpleNamespace:
    return SimpleNamespace(network_on_disk=SimpleNamespace(filename=file))


def test_each_lora_gets_the_entries_its_clone_added_in_unet_and_text_encoder() -> None:
    model = model_with([("A.safetensors", 1.0, 1.0), ("Z.safetensors", 0, 0), ("B.safetensors", 0.5, 0.0)])
    p = SimpleNamespace(sd_model=model)
    host = reforge.ReforgeHost()
    unet = model.forge_objects.unet
    a = strengths(host.entries(p, unet, [net("A.safetensors")]))
    assert a == {
        "diffusion_model.a.weight": [(1.0, "A.safetensors")],
        "diffusion_model.A.safetensors.weight": [(1.0, "A.safetensors")],
    }
    assert strengths(host.entries(p, model.forge_objects.clip.patcher, [net("B.safetensors")])) == {
        "clip_l.a.weight": [(0.0, "B.safetensors")]
    }
    assert host.entries(p, unet, [net("Z.safetensors")]) == {}


def test_a_lora_written_twice_is_both_of_its_applications() -> None:
    model = model_with([("A.safetensors", 1.0, 1.0), ("A.safetensors", 0.5, 1.0)])
    p = SimpleNamespace(sd_model=model)
    entries = reforge.ReforgeHost().entries(p, model.forge_objects.unet, [net("A.safetensors")])
    assert strengths(entries)["diffusion_model.a.weight"] == [(1.0, "A.safetensors"), (0.5, "A.safetensors")]


def test_strip_leaves_the_others_and_a_new_uuid_on_a_clone_only() -> None:
    model = model_with([("A.safetensors", 1.0, 1.0), ("B.safetensors", 1.0, 1.0)])
    p = SimpleNamespace(sd_model=model)
    unet = model.forge_objects.unet
    ours = SimpleNamespace(patches={k: v[:] for k, v in unet.patches.items()}, patches_uuid="same")
    reforge.ReforgeHost().strip(p, ours, [net("A.safetensors")])
    assert strengths(ours.patches) == {
        "diffusion_model.a.weight": [(1.0, "B.safetensors")],
        "diffusion_model.B.safetensors.weight": [(1.0, "B.safetensors")],
    }
    assert ours.patches_uuid != "same"
    assert len(unet.patches["diffusion_model.a.weight"]) == 2, "the patcher it was cloned from keeps everything"


def test_patchers_that_do_not_match_the_applied_list_are_refused() -> None:
    model = model_with([("A.safetensors", 1.0, 1.0)])
    model.current_lora_hash = str([["A.safetensors", 1.0, 1.0], ["B.safetensors", 1.0, 1.0]])
    assert reforge.applied_entries(model) is None
    model.forge_objects_after_applying_lora.unet = SimpleNamespace(patches={}, parent=None)  # rebuilt elsewhere
    assert reforge.applied_entries(model) is None


def test_strengths_rewritten_after_loading_are_composed_as_they_are_and_dropped_entries_refused() -> None:
    """LoRA Block Weight rewrites the last patcher's entries with its block weights (``lbwrf``: new tuples, the same
    adapters), and keeps only plain LoRA entries."""
    model = model_with([("A.safetensors", 1.0, 1.0), ("B.safetensors", 1.0, 1.0)])
    p = SimpleNamespace(sd_model=model, scripts=None)
    unet = model.forge_objects.unet
    host = reforge.ReforgeHost()
    unet.model = SimpleNamespace()
    unet.patches = {key: [(0.5 * e[0], *e[1:]) for e in entries] for key, entries in unet.patches.items()}
    assert host.backend_refusal(p, unet) is None
    assert strengths(host.entries(p, unet, [net("A.safetensors")]))["diffusion_model.a.weight"] == [
        (0.5, "A.safetensors")
    ]
    unet.patches = {key: entries[1:] for key, entries in unet.patches.items()}
    assert "(another extension): they cannot be told apart by LoRA" in host.backend_refusal(p, unet)


def test_the_chains_are_walked_once_per_pass_start_and_again_when_the_builtin_reapplied_the_loras(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = model_with([("A.safetensors", 1.0, 1.0), ("B.safetensors", 1.0, 1.0)])
    p = SimpleNamespace(sd_model=model, scripts=None)
    walks: list[object] = []
    walk = reforge.applied_entries
    monkeypatch.setattr(reforge, "applied_entries", lambda m: walks.append(m) or walk(m))
    host, unet = reforge.ReforgeHost(), model.forge_objects.unet
    unet.model = SimpleNamespace()
    for name in ("A.safetensors", "B.safetensors"):  # a pass's checks, one LoRA at a time, and the text encoder
        host.entries(p, unet, [net(name)])
        host.entries(p, model.forge_objects.clip.patcher, [net(name)])
    assert host.backend_refusal(p, unet) is None and len(walks) == 1
    again = model_with([("A.safetensors", 1.0, 1.0), ("B.safetensors", 1.0, 1.0)])  # the hires pass's new clones
    p.sd_model = again
    assert strengths(host.entries(p, again.forge_objects.unet, [net("B.safetensors")]))["diffusion_model.a.weight"]
    assert len(walks) == 2
