"""What the Forge tier's tests share: prompts, the Multi-LoRA API args and the noise floor (the no-trace
snapshot is every tier's: tests/hosts/tier.py).

"The same image" is the A1111 tier's ``SAME`` (max pixel difference <= 2/255); a test that compares two different
computation paths first measures the noise floor (:func:`reference_within_floor`: one reference computed two
mathematically equal ways, within that tier's ``NOISE_FLOOR``, 1/255), so that SAME is not hiding a real difference.
LoRAs are used at weight 0.5, where that holds on the tiny random model.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from webui.server import assert_noise_floor

from .server import REFORGE, START_TIMEOUT

if TYPE_CHECKING:
    import numpy as np
    from webui.server import Result, WebuiClient

TITLE = "Multi-LoRA Composition"
PROMPT = "a photo of a cat"
STEPS = 6
#: A mean pixel difference above this is "a different image".
DIFFERENT = 2
AB = f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5>"
ABC = f"{AB} <lora:mlC:0.5>"
#: B in the text encoder only (Forge's extra_networks_lora: ``<lora:name:te:unet>``, the unet weight defaulting
#: to the te one), so the UNet sees A alone.
A_UNET = f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5:0>"


def multilora(method: str, tau: int = 5, loras: str = "", enabled: bool = True) -> dict[str, Any]:
    """The positional ``alwayson_scripts`` args (panel order: enabled, method, tau, loras)."""
    return {"alwayson_scripts": {TITLE: {"args": [enabled, method, tau, loras]}}}


def ml(**named: Any) -> dict[str, Any]:
    """The named-dict form of the args, enabled."""
    return {"alwayson_scripts": {TITLE: {"args": [{"enabled": True, **named}]}}}


def multidiffusion(tile_batch: int = 4) -> dict[str, Any]:
    """The built-in MultiDiffusion on: 48x48 tiles overlapping by 16, ``tile_batch`` tiles per UNet call (reForge's
    panel has a SpotDiffusion shift method last, unused by this method: its default)."""
    args = [True, "MultiDiffusion", 48, 48, 16, tile_batch, *(("random",) if REFORGE else ())]
    return {"MultiDiffusion Integrated": {"args": args}}


def gen(forge: WebuiClient, prompt: str, **extra: Any) -> Result:
    """A 64x64 txt2img of STEPS Euler steps (seed 1234, cfg 7)."""
    return forge.txt2img(prompt=prompt, **{"steps": STEPS, **extra})


def reference_within_floor(forge: WebuiClient, one: str, other: str, **extra: Any) -> np.ndarray:
    """Make the reference ``one`` and the equal ``other`` (e.g. its LoRAs in another order), require them within the
    noise floor of each other and return ``one``'s image. ``other`` is made first: a test's next generation, with
    ``one``'s prompt, then finds its conds in the webui's cache (it keeps the last prompt's)."""
    equal = gen(forge, other, **extra).image
    reference = gen(forge, one, **extra).image
    assert_noise_floor(reference, equal)
    return reference


def assert_loaded(log: str, name: str, n_unet: int, n_te: int) -> None:
    """The host's log says it patched ``n_unet`` UNet and ``n_te`` text-encoder weights from LoRA ``name`` and
    skipped none (Forge: a line per part; reForge: one line with both counts, a warning per key left out)."""
    if REFORGE:
        counts = rf"with {n_unet + n_te} keys \(UNet: {n_unet}, CLIP: {n_te}\)"
        assert re.search(rf"\[LORA\] Loaded \S*{name}\.safetensors for \w+ {counts}", log), log
        assert "NOT LOADED" not in log, log
        return
    for part, n in (("UNet", n_unet), ("CLIP", n_te)):
        if n:
            assert re.search(rf"{name}\.safetensors for \w+-{part} with {n} keys .* \(skipped 0 keys\)", log), log


def model_links(manifest: dict[str, Any], ckpt_dir: Path, lora_dir: Path) -> dict[Path, Path]:
    """Where a built model's files (``manifest``: its checkpoints and LoRAs) go in a server's model folders."""
    built = [Path(path) for path in manifest.get("checkpoints", {}).values()] or [Path(manifest["ckpt"])]
    links = {ckpt_dir / path.name: path for path in built}
    return links | {lora_dir / Path(lora["path"]).name: Path(lora["path"]) for lora in manifest["loras"].values()}


@contextmanager
def linked(client: WebuiClient, links: dict[Path, Path]) -> Iterator[None]:
    """Each file (value) linked at its place in the server's model folders (key) for the block, the server's
    checkpoint and LoRA lists refreshed after linking and after unlinking (even after a failure)."""
    try:
        for link, target in links.items():
            link.symlink_to(target)
        client.post("/sdapi/v1/refresh-checkpoints")
        client.post("/sdapi/v1/refresh-loras")
        yield
    finally:
        for link in links:
            link.unlink(missing_ok=True)
        client.post("/sdapi/v1/refresh-checkpoints")
        client.post("/sdapi/v1/refresh-loras")


@contextmanager
def checkpoint(client: WebuiClient, name: str, **warm_up: Any) -> Iterator[None]:
    """The server's model is checkpoint ``name`` for the block (the host loads it at the next generation); after it,
    even after a failure, the previous one again, loaded by a 1-step image (``warm_up``: its other settings), as the
    tests after it expect that model in memory. The client waits as long as for a server start meanwhile: loading, or
    merging and encoding with a new LoRA set, outlasts its 60 s on a busy 2-core machine."""
    previous, timeout = client.get("/sdapi/v1/options")["sd_model_checkpoint"], client.timeout
    client.timeout = max(timeout, START_TIMEOUT)
    try:
        client.post("/sdapi/v1/options", {"sd_model_checkpoint": name})
        yield
    finally:
        try:
            client.post("/sdapi/v1/options", {"sd_model_checkpoint": previous})
            client.txt2img(**{"prompt": PROMPT, "steps": 1, **warm_up})
        finally:
            client.timeout = timeout


def xyz_args(x_type: int, x_values: str) -> list[Any]:
    """x/y/z plot's positional args (its ui() order, the same on Forge): X axis only, legend, sub images. reForge's
    has three more after the legend: individual labels, skip the grid, items per grid (off, off, 0)."""
    legend = [True, *((False, False, 0) if REFORGE else ())]
    return [x_type, x_values, None, 0, "", None, 0, "", None, *legend, True, False, False, False, False, False, 0, True]


def axis_index(forge: WebuiClient, label: str) -> int:
    """The index of an X/Y/Z axis in the txt2img ``X type`` choices."""
    info = next(s for s in forge.get("/sdapi/v1/script-info") if s["name"] == "x/y/z plot" and not s["is_img2img"])
    return next(a["choices"] for a in info["args"] if a["label"] == "X type").index(label)
