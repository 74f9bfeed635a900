"""Multi-LoRA beside the extensions Forge users run, in a real Forge: its built-in ControlNet (with a tiny random
ControlNet, tiny_controlnet.py) and the built-ins that put model options, patches or wrappers on the UNet's patcher.

Every check first shows the neighbour acts on the tiny model (the image with it differs from the image without it;
FreeU, which leaves this model as it is, is said to), then, with it on: Composite over mlA and mlAcopy (a byte copy of
mlA) is the plain ``<lora:mlA>`` with the copy in the text encoder only, and so are Switch with tau >= steps and Spatial
over the two; Batched Composite over mlA and mlB is the Sequential image, and beside an extension that patches the UNet
it runs sequentially and names it; no traceback; nothing left behind. 64x64, FEW_STEPS Euler steps, LoRAs at 0.5; the
noise floor is measured under each neighbour."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hosts.tier import assert_no_trace, interrupted, snapshot
from webui.server import SAME, assert_noise_floor, encode_image, max_diff, mean_diff, server_env, trace

from .helpers import AB, DIFFERENT, PROMPT, gen, ml, multidiffusion
from .server import REFORGE, SKIP_REASON, forge_dir_from_env, forge_python

if TYPE_CHECKING:
    import numpy as np
    from webui.server import Result, WebuiClient

    from .conftest import ForgeAssets
    from .server import ForgeServer

if forge_dir_from_env() is None:
    pytest.skip(SKIP_REASON, allow_module_level=True)

np = pytest.importorskip("numpy")

pytestmark = pytest.mark.usefixtures("no_tracebacks")

HERE = Path(__file__).resolve().parent
COPY = "mlAcopy"
#: A in the UNet, its copy in the text encoder only (``<lora:name:te:unet>``): what Composite, Switch with tau >=
#: steps and Spatial over A and its copy make, as a plain generation.
A_COPY = f"{PROMPT} <lora:mlA:0.5> <lora:{COPY}:0.5:0>"
#: The same, the tags the other way round: the noise floor.
COPY_A = f"{PROMPT} <lora:{COPY}:0.5:0> <lora:mlA:0.5>"
A_AND_COPY = f"{PROMPT} <lora:mlA:0.5> <lora:{COPY}:0.5>"
#: The ControlNet's hint, a seeded noise image (module "None": the image goes to the ControlNet as it is).
HINT = encode_image(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
CN = "ControlNet"
#: Fewer steps than the tier's other modules: the module makes about 100 images.
FEW_STEPS = 3
LONG_STEPS = 200  # an interrupted run stops after a few of these


def scripts(*parts: dict[str, Any]) -> dict[str, Any]:
    """One ``alwayson_scripts`` payload from neighbour entries and ``ml(...)`` payloads."""
    merged: dict[str, Any] = {}
    for part in parts:
        merged.update(part.get("alwayson_scripts", part))
    return {"alwayson_scripts": merged}


def run(forge: WebuiClient, prompt: str, *parts: dict[str, Any], **extra: Any) -> Result:
    """A 64x64 txt2img of FEW_STEPS Euler steps with the neighbours and Multi-LoRA args of ``parts``."""
    return gen(forge, prompt, **scripts(*parts), **{"steps": FEW_STEPS, **extra})


def controlnet_unit(model: str) -> dict[str, Any]:
    """One unit of Forge's ControlNet as its API takes it."""
    return {"enabled": True, "module": "None", "model": model, "image": HINT, "weight": 1.0}


@pytest.fixture(scope="module", autouse=True)
def no_recompute(forge: WebuiClient) -> Iterator[None]:
    """The trace does not recompute Composite and Spatial calls here: its recomputes are UNet calls of their own, and
    SAG or reference would keep their state (and cost a pass each)."""
    previous = forge.post("/multilora-probe/recompute", {"enabled": False})
    yield
    forge.post("/multilora-probe/recompute", previous)


@pytest.fixture
def recompute(forge: WebuiClient) -> Iterator[None]:
    """The trace's recompute on for one test (``diff_vs_mean``, ``cond_rows``, ``diff_vs_spatial``)."""
    forge.post("/multilora-probe/recompute", {"enabled": True})
    yield
    forge.post("/multilora-probe/recompute", {"enabled": False})


@pytest.fixture(scope="module")
def copy_of_a(forge: WebuiClient, forge_assets: ForgeAssets) -> Iterator[str]:
    """mlAcopy: mlA's file under another name (Forge patches it as a LoRA of its own), for this module only."""
    path = forge_assets.lora_dir / f"{COPY}.safetensors"
    shutil.copyfile(forge_assets.loras["mlA"]["path"], path)
    forge.post("/sdapi/v1/refresh-loras")
    yield COPY
    path.unlink()
    forge.post("/sdapi/v1/refresh-loras")


@pytest.fixture(scope="module")
def controlnet(forge_dir: Path, forge_server: ForgeServer, forge: WebuiClient) -> str:
    """The tiny ControlNet, written into the session Forge's ControlNet folder (``<data dir>/models/ControlNet``)
    and listed (its panel's refresh): its model name for a unit."""
    folder = forge_server.data_dir / "models" / "ControlNet"
    command = [forge_python(), str(HERE / "tiny_controlnet.py"), str(folder), "--forge", str(forge_dir)]
    done = subprocess.run(command, cwd=forge_dir, env=server_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stem = Path(json.loads(done.stdout.strip().splitlines()[-1])["path"]).stem
    names = forge.post("/multilora-probe/controlnet-refresh")["model_list"]
    return next(name for name in names if name.split(" [")[0] == stem)


@pytest.fixture(scope="module")
def without_neighbour(forge: WebuiClient, copy_of_a: str) -> Callable[[int], list[np.ndarray]]:
    """The plain (Merge) A_AND_COPY images of a batch size without any neighbour, made once per batch size: what
    shows a neighbour acts."""
    made: dict[int, list[np.ndarray]] = {}

    def images(batch_size: int) -> list[np.ndarray]:
        if batch_size not in made:
            made[batch_size] = run(forge, A_AND_COPY, batch_size=batch_size).images
        return made[batch_size]

    return images


def assert_same(reference: list[np.ndarray], result: Result, what: str) -> None:
    assert len(result.images) == len(reference), what
    for got, expected in zip(result.images, reference, strict=True):
        assert max_diff(got, expected) <= SAME, f"{what}: {max_diff(got, expected)}/255 from the reference"


def assert_warned(result: Result, warning: str | None) -> None:
    """The infotext's Multi-LoRA warning says ``warning``, or there is none."""
    if warning is None:
        assert "Multi-LoRA warning" not in result.infotext, result.infotext
    else:
        assert "Multi-LoRA warning" in result.infotext and warning in result.infotext, result.infotext


#: Switch with tau >= steps never reaches the second LoRA, and says so.
UNREACHED = f"{COPY} got no step"


def methods_over_a_and_its_copy(
    forge: WebuiClient, reference: list[np.ndarray], neighbour: dict[str, Any], what: str, **extra: Any
) -> None:
    """Switch (tau >= steps), Composite and Spatial over A and its copy beside ``neighbour`` are ``reference``."""
    for method, warning in (("Switch", UNREACHED), ("Composite", None), ("Spatial", None)):
        result = run(forge, A_AND_COPY, neighbour, ml(method=method, tau=FEW_STEPS), **extra)
        assert f"Multi-LoRA method: {method}" in result.infotext, result.infotext
        assert_same(reference, result, f"{method} over A and its copy beside {what}")
        assert_warned(result, warning)


def assert_batched_is_sequential(
    forge: WebuiClient, neighbour: dict[str, Any], fallback: str | None, **extra: Any
) -> None:
    """Batched Composite over A and B beside ``neighbour`` is the Sequential image; it says ``fallback`` (None: it
    stays batched)."""
    sequential = run(forge, AB, neighbour, ml(method="Composite", execution="Sequential"), **extra)
    batched = run(forge, AB, neighbour, ml(method="Composite", execution="Batched"), **extra)
    assert_same(sequential.images, batched, "Batched")
    assert_warned(batched, fallback)


# --- Forge's built-in ControlNet ----------------------------------------------------------------------------------


def test_controlnet_reaches_every_pass_of_a_step(
    forge: WebuiClient, controlnet: str, without_neighbour: Callable[[int], list[np.ndarray]]
) -> None:
    """Forge computes the control once per model call and its UNet pops the residuals off the lists as it adds them:
    each of the passes of a step gets its own copy of the lists, so every LoRA runs with the ControlNet."""
    cn = {CN: {"args": [controlnet_unit(controlnet)]}}
    reference = run(forge, A_COPY, cn).images
    assert_noise_floor(reference[0], run(forge, COPY_A, cn).image)
    assert_same(reference, run(forge, A_COPY, cn, ml(method="Composite", loras="mlA")), "Composite over A")
    before = snapshot(forge, lambda: run(forge, A_AND_COPY, cn))
    assert mean_diff(before.images[0], without_neighbour(1)[0]) > DIFFERENT, "the ControlNet acts on the tiny model"
    methods_over_a_and_its_copy(forge, reference, cn, "ControlNet")
    assert_same(reference, run(forge, A_AND_COPY, cn, ml(method="Composite", execution="Batched")), "Batched")
    assert_no_trace(forge, lambda: run(forge, A_AND_COPY, cn), before)


@pytest.mark.usefixtures("recompute")
def test_controlnet_batched_equals_sequential_the_mean_of_passes_with_the_control(
    forge: WebuiClient, controlnet: str
) -> None:
    """Every step of Sequential is the mean of fresh single-LoRA calls that all got the control (the probe's
    recompute); Batched, the batch and its control replicated per LoRA, is the same image."""
    cn = {CN: {"args": [controlnet_unit(controlnet)]}}
    composite = ml(method="Composite", execution="Sequential")
    reference = run(forge, AB, cn, composite).image
    calls = trace(forge)
    assert len(calls) == FEW_STEPS and all(c["active"] == [0, 1] and c["diff_vs_mean"] <= 1e-4 for c in calls), calls
    assert_noise_floor(reference, run(forge, f"{PROMPT} <lora:mlB:0.5> <lora:mlA:0.5>", cn, composite).image)
    assert_batched_is_sequential(forge, cn, None)


def test_controlnet_interrupted_composite_leaves_no_trace(forge: WebuiClient, controlnet: str) -> None:
    """A Composite generation with a unit, interrupted mid-sampling, leaves the model as a plain one leaves it."""
    cn = {CN: {"args": [controlnet_unit(controlnet)]}}
    before = snapshot(forge, lambda: run(forge, AB, cn))
    body = scripts(cn, ml(method="Composite"))
    result = interrupted(forge, lambda client: client.txt2img(prompt=AB, steps=LONG_STEPS, **body), LONG_STEPS)
    assert "Multi-LoRA method: Composite" in result.infotext
    assert_no_trace(forge, lambda: run(forge, AB, cn), before)


# --- the other built-ins that put options, patches or wrappers on the UNet's patcher ------------------------------


@dataclass(frozen=True)
class Neighbour:
    """A built-in as the API drives it: its ``alwayson_scripts`` entry, its folder under extensions-builtin (what a
    Batched fallback names), whether it patches the UNet (then Batched runs sequentially beside it and names it;
    MultiDiffusion wraps the UNet call and the batched call runs inside it, Dynamic Thresholding and Latent Modifier
    work on the CFG results), whether it acts on the tiny model, and the request's other settings."""

    entry: dict[str, Any]
    folder: str
    patches_unet: bool
    acts: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    #: what the Batched fallback names, when not ``folder``: reForge's built-ins patch the UNet with its
    #: ``ldm_patched.contrib`` nodes, whose module is what the patch function tells
    owner: str | None = None


NEIGHBOURS = {
    # FreeU scales only the blocks of 2x and 4x the model channels (640, 1280): the tiny UNet has one level of 320,
    # so it changes nothing here. Its output-block patch is still there, and Batched falls back for it.
    "FreeU": Neighbour(
        {"FreeU Integrated (SD 1.x, SD 2.x, SDXL)": {"args": [True, 1.5, 1.6, 0.9, 0.2, 0.0, 1.0]}},
        "sd_forge_freeu",
        patches_unet=True,
        acts=False,
    ),
    "SAG": Neighbour(
        {"SelfAttentionGuidance Integrated (SD 1.x, SD 2.x, SDXL)": {"args": [True, 0.5, 2.0, 1.0]}},
        "sd_forge_sag",
        patches_unet=True,
    ),
    "PAG": Neighbour(
        {"PerturbedAttentionGuidance Integrated": {"args": [True, 3.0, 0.0, 0.0, 1.0]}},
        "sd_forge_perturbed_attention",
        patches_unet=True,
    ),
    "DynamicThresholding": Neighbour(
        {
            "DynamicThresholding (CFG-Fix) Integrated": {
                "args": [True, 3.0, 0.9, "Constant", 0.0, "Constant", 0.0, 1.0, "enable", "MEAN", "AD", 1.0]
            }
        },
        "sd_forge_dynamic_thresholding",
        patches_unet=False,
    ),
    "KohyaHRFix": Neighbour(
        {"Kohya HRFix Integrated": {"args": [True, 1, 2.0, 0.0, 1.0, True, "bicubic", "bicubic"]}},
        "sd_forge_kohya_hrfix",
        patches_unet=True,
    ),
    # StyleAlign shares self-attention across the images of a batch: it acts from two images on
    "StyleAlign": Neighbour(
        {"StyleAlign Integrated": {"args": [True, 1.0]}},
        "sd_forge_stylealign",
        patches_unet=True,
        extra={"batch_size": 2},
    ),
    "LatentModifier": Neighbour(
        {
            "LatentModifier Integrated": {
                "args": [
                    *(True, 0.0, "anisotropic", 0.0, "reinhard", 100.0, 0.0, "subtract", 0.0),
                    0.7,  # rescale CFG phi: the one setting on; the others are the panel's defaults
                    *("gaussian", "add", 0.0, 100, 127, 0.0, "hard_clamp", 5.0, 0.0, "None", "None"),
                ]
            }
        },
        "sd_forge_latent_modifier",
        patches_unet=False,
    ),
    "MultiDiffusion": Neighbour(multidiffusion(4), "sd_forge_multidiffusion", patches_unet=False),
    # ControlNet's reference_only preprocessor needs no model: it records the reference's self-attention in a pass of
    # its own and attends to it in every call
    "Reference": Neighbour(
        {CN: {"args": [{"enabled": True, "module": "reference_only", "model": "None", "image": HINT}]}},
        "forge_preprocessor_reference",
        patches_unet=True,
    ),
}


#: reForge's built-ins: the same folders, older panels (titles and args as their scripts' ``ui()`` return them), the
#: same settings; it has no PAG and no StyleAlign (their tests are deselected there).
REFORGE_NEIGHBOURS = {
    "FreeU": Neighbour(
        {"FreeU Integrated": {"args": [True, 1.5, 1.6, 0.9, 0.2]}},
        "sd_forge_freeu",
        patches_unet=True,
        acts=False,
        owner="ldm_patched.contrib.nodes_freelunch",
    ),
    "SAG": Neighbour(
        {"SelfAttentionGuidance Integrated": {"args": [True, 0.5, 2.0]}},
        "sd_forge_sag",
        patches_unet=True,
        owner="ldm_patched.contrib.nodes_sag",
    ),
    "DynamicThresholding": Neighbour(
        {
            "DynamicThresholding (CFG-Fix) Integrated": {
                # its second arg is the panel's "simple mode" (off: every setting as given)
                "args": [True, False, 3.0, 0.9, "Constant", 0.0, "Constant", 0.0, 1.0, "enable", "MEAN", "AD", 1.0]
            }
        },
        "sd_forge_dynamic_thresholding",
        patches_unet=False,
    ),
    "KohyaHRFix": replace(NEIGHBOURS["KohyaHRFix"], owner="ldm_patched.contrib.nodes_model_downscale"),
    "LatentModifier": Neighbour(
        {
            "LatentModifier Integrated": {
                "args": [
                    *(False, 0.0, "anisotropic", "None"),  # sharpness
                    *(False, 0.0, "reinhard", 100.0, 0.0),  # tone
                    *(True, "gaussian", "add", 0.0, 100, "subtract", 0.0),  # noise and combat: on for ...
                    0.7,  # ... rescale CFG phi, the one setting that acts; the others are the panel's defaults
                    *(False, 127, 0.0, "hard_clamp", 5.0, 0.0),  # advanced
                    *(False, "None"),  # dynamic CFG
                ]
            }
        },
        "sd_forge_latent_modifier",
        patches_unet=False,
    ),
    "MultiDiffusion": Neighbour(multidiffusion(4), "sd_forge_multidiffusion", patches_unet=False),
    "Reference": NEIGHBOURS["Reference"],
}
HOST_NEIGHBOURS = REFORGE_NEIGHBOURS if REFORGE else NEIGHBOURS


@pytest.mark.parametrize(
    "name",
    [
        name
        if name in REFORGE_NEIGHBOURS
        else pytest.param(name, marks=pytest.mark.forge2_only(f"{NEIGHBOURS[name].folder} is not built into reForge"))
        for name in NEIGHBOURS
    ],
)
def test_builtin_beside_every_method(
    forge: WebuiClient, copy_of_a: str, without_neighbour: Callable[[int], list[np.ndarray]], name: str
) -> None:
    """Each built-in that puts options, patches or wrappers on the UNet's patcher, beside every method."""
    n = HOST_NEIGHBOURS[name]
    reference = run(forge, A_COPY, n.entry, **n.extra).images
    assert_noise_floor(reference[0], run(forge, COPY_A, n.entry, **n.extra).image)
    assert_batched_is_sequential(
        forge, n.entry, f"the UNet patches of {n.owner or n.folder}" if n.patches_unet else None, **n.extra
    )
    before = snapshot(forge, lambda: run(forge, A_AND_COPY, n.entry, **n.extra))
    plain = without_neighbour(n.extra.get("batch_size", 1))
    if n.acts:
        assert mean_diff(before.images[0], plain[0]) > DIFFERENT, f"{name} acts on the tiny model"
    else:
        assert max_diff(before.images[0], plain[0]) == 0, f"{name} was expected to leave the tiny model as it is"
    methods_over_a_and_its_copy(forge, reference, n.entry, name, **n.extra)
    assert_no_trace(forge, lambda: run(forge, A_AND_COPY, n.entry, **n.extra), before)


@pytest.mark.usefixtures("recompute")
def test_spatial_inside_multidiffusion_knows_the_rows_of_every_tile_batch(forge: WebuiClient) -> None:
    """MultiDiffusion stacks k tiles per call, each with all of the UNet call's rows in their order: Spatial mixes
    the cond rows of every tile, so a tile batch of 4 gives the image a tile batch of 1 gives."""

    tiles = multidiffusion
    assert_noise_floor(run(forge, AB, tiles(4)).image, run(forge, AB, tiles(1)).image)
    one = run(forge, AB, tiles(1), ml(method="Spatial"))
    assert all(len(c["cond_rows"]) == 2 for c in trace(forge))
    four = run(forge, AB, tiles(4), ml(method="Spatial"))
    calls = trace(forge)
    assert_warned(four, None)
    for c in calls:
        rows = c["cond_rows"]
        assert len(rows) == 8 and rows == rows[:2] * 4 and sorted(rows[:2]) == [False, True], c
        assert c["diff_vs_spatial"] <= 1e-5, c
    assert max_diff(one.image, four.image) <= SAME
    composite = run(forge, AB, tiles(4), ml(method="Composite"))
    assert mean_diff(composite.image, four.image) > DIFFERENT, "Spatial is not Composite here"
