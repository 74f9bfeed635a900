"""Multi-LoRA beside ADetailer (Bing-su, v25.3.0: ../shared/hosts), the same checks on every host: each tier's
``test_adetailer.py`` gives them its server (fixture ``ad``: a client of a host with our extension, the probes and
ADetailer, ``--ad-no-huggingface``; ``ad_neighbours``: the folder ADetailer is unpacked in; ``ad_reforge``: whether
the host is reForge, whose X/Y/Z plot takes more args) and imports them from here.

ADetailer re-paints each face it finds in an img2img pass of its own after the main pass; the tiny random models never
draw a face, so every generation here is an img2img of a real photo (scikit-image's astronaut, 128 px) with
ADetailer's "skip img2img": the image is the photo with ADetailer's pass over the face box, so what Multi-LoRA does in
that pass is all the image shows. ADetailer's mediapipe detector finds the face there (its errors read as "nothing
found": :func:`assert_only_the_face_changed` proves it found one, and that nothing outside its box changed). Mask
blur and dilation are 0, so the box is exactly what may change.

Which scripts run in ADetailer's pass is its option "Script names to apply to ADetailer" (``ad_script_names``, file
stems), set through the options API: ``multilora`` or not, and the probes (their ``process`` starts each pass's
trace and progress count), so :func:`trace` is the last pass's, the face pass's.

LoRAs at 0.5, where two exact paths to one image stay within the noise floor (measured here).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from hosts.tier import assert_no_trace, axis_index, interrupted, snapshot, xyz_args

if TYPE_CHECKING:
    import numpy as np
    from webui.server import Result, WebuiClient

__all__ = [  # what a tier's test_adetailer.py collects: the fixtures and the checks
    "box",
    "by_default",
    "made",
    "opted_in",
    "test_a_batch_of_two_through_two_adetailer_tabs",
    "test_by_default_the_detail_pass_runs_merged_and_the_infotext_says_so",
    "test_no_trace_after_detail_passes_interrupts_included",
    "test_opted_in_every_method_runs_exactly_in_the_detail_pass",
    "test_the_detail_pass_composes_the_loras_of_its_own_prompt",
    "test_xyz_cells_reach_the_detail_pass",
]

TITLE = "Multi-LoRA Composition"
ADETAILER = "adetailer"
#: ADetailer's flag: no YOLO model downloads at start (offline, each would be a warning).
AD_FLAGS = ("--ad-no-huggingface",)
#: What ADetailer's detector finds the face in (scikit-image's photo at this size: confidence ~0.92).
SIZE = 128
STEPS = 8
#: The probes' script stems on every host (only the host's own are there): in ADetailer's list, they trace its pass.
PROBES = "multilora_trace,multilora_faults,multilora_forge_probe"
OPTED_IN = f"multilora,{PROBES}"
#: ADetailer's tab: mediapipe's short-range face detector, the box exactly (no blur, no dilation), re-painted at 64 px
#: (the crop's own size: the pass costs a quarter of one at the image's 128).
TAB = {
    "ad_model": "mediapipe_face_short",
    "ad_mask_blur": 0,
    "ad_dilate_erode": 0,
    "ad_use_inpaint_width_height": True,
    "ad_inpaint_width": 64,
    "ad_inpaint_height": 64,
}
A_COPY, B_COPY = "mlAcopy", "mlBcopy"
AB = "a portrait <lora:mlA:0.5> <lora:mlB:0.5>"
#: mlA in the UNet, its byte copy in the text encoder only: what Composite and Spatial over the two and Switch with
#: tau >= steps make, as a plain generation; the tags the other way round give the noise floor.
A_AND_COPY = f"a portrait <lora:mlA:0.5> <lora:{A_COPY}:0.5>"
A_UNET = f"a portrait <lora:mlA:0.5> <lora:{A_COPY}:0.5:0>"
A_UNET_SWAPPED = f"a portrait <lora:{A_COPY}:0.5:0> <lora:mlA:0.5>"
BA = "a portrait <lora:mlB:0.5> <lora:mlA:0.5>"
#: mlB alone in the UNet, mlA in the text encoder: Switch over BA with tau >= steps, as a plain generation.
B_UNET = "a portrait <lora:mlB:0.5> <lora:mlA:0.5:0>"
B_UNET_SWAPPED = "a portrait <lora:mlA:0.5:0> <lora:mlB:0.5>"
WARNING = "Multi-LoRA warning"
MERGED = "ADetailer's detail pass ran with every LoRA merged"
LONG_STEPS = 400  # ADetailer's pass of an interrupted run: 160 steps at its denoising strength 0.4


def copy_loras(lora_dir: Path) -> None:
    """mlAcopy and mlBcopy beside mlA and mlB (byte copies: the same LoRA under another name)."""
    for name, copy in (("mlA", A_COPY), ("mlB", B_COPY)):
        target = lora_dir / f"{copy}.safetensors"
        if not target.exists():
            target.write_bytes((lora_dir / f"{name}.safetensors").read_bytes())


@cache
def photo() -> np.ndarray:
    import numpy as np
    from PIL import Image
    from skimage import data

    return np.array(Image.fromarray(data.astronaut()).resize((SIZE, SIZE), Image.LANCZOS))


def face_box(neighbours: Path) -> tuple[int, int, int, int]:
    """ADetailer's own detector's box on the photo: (x1, y1, x2, y2) in pixels, rounded outwards."""
    import math

    from PIL import Image

    sys.path.insert(0, str(neighbours / ADETAILER))
    try:
        from adetailer import mediapipe_predict
    finally:
        sys.path.remove(str(neighbours / ADETAILER))
    found = mediapipe_predict(TAB["ad_model"], Image.fromarray(photo()))
    assert len(found.bboxes) == 1, f"ADetailer's detector found {len(found.bboxes)} faces in the photo"
    x1, y1, x2, y2 = found.bboxes[0]
    return math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2)


def assert_only_the_face_changed(result: Result, box: tuple[int, int, int, int]) -> None:
    """Every image is the photo but inside the face box, where ADetailer's pass changed it (so it found the face)."""
    import numpy as np

    x1, y1, x2, y2 = box
    for image in result.images:
        changed = np.abs(image.astype(np.int16) - photo().astype(np.int16)).max(axis=2) > 0
        inside = np.zeros_like(changed)
        inside[y1 : y2 + 1, x1 : x2 + 1] = True
        assert not (changed & ~inside).any(), "ADetailer's pass changed pixels outside the face box"
        assert changed[inside].mean() > 0.5, "ADetailer's pass left the face as it was: did it find one?"


def detail(
    client: WebuiClient,
    prompt: str,
    ml: dict[str, Any] | None = None,
    tabs: tuple[dict[str, Any], ...] = ({},),
    **payload: Any,
) -> Result:
    """The photo through img2img with ADetailer's skip img2img (its pass on the face is the image) and, with ``ml``,
    Multi-LoRA's named args, enabled."""
    scripts: dict[str, Any] = {"ADetailer": {"args": [True, True, *({**TAB, **tab} for tab in tabs)]}}
    if ml is not None:
        scripts[TITLE] = {"args": [{"enabled": True, **ml}]}
    body = {"init_images": [photo()], "width": SIZE, "height": SIZE, "steps": STEPS, "alwayson_scripts": scripts}
    return client.img2img(prompt=prompt, **{**body, **payload})


def scripts_in_detail_pass(client: WebuiClient, names: str) -> None:
    client.post("/sdapi/v1/options", {"ad_script_names": names})


class Made:
    """The module's images that more than one check compares with, each made once: a plain generation (its pass is
    the same whether Multi-LoRA may run in it or not: it does nothing there) and Composite over mlA and mlB in
    ADetailer's pass."""

    def __init__(self, client: WebuiClient) -> None:
        self.client = client
        self.merged: Result | None = None
        self.composite: Result | None = None

    def merge(self) -> Result:
        self.merged = self.merged or detail(self.client, AB)
        return self.merged

    def composite_in_detail_pass(self) -> Result:
        """Made opted in."""
        self.composite = self.composite or detail(self.client, AB, ml={"method": "Composite"})
        return self.composite


@pytest.fixture(scope="module")
def made(ad: WebuiClient) -> Made:
    return Made(ad)


@pytest.fixture
def opted_in(ad: WebuiClient) -> Iterator[None]:
    """Multi-LoRA among the scripts ADetailer runs in its pass (and the probes), for the test."""
    scripts_in_detail_pass(ad, OPTED_IN)
    yield
    scripts_in_detail_pass(ad, PROBES)


@pytest.fixture
def by_default(ad: WebuiClient) -> None:
    """ADetailer's pass without Multi-LoRA (its default list names no Multi-LoRA script), the probes in it."""
    scripts_in_detail_pass(ad, PROBES)


@pytest.fixture(scope="module")
def box(ad_neighbours: Path) -> tuple[int, int, int, int]:
    return face_box(ad_neighbours)


def active(client: WebuiClient) -> list[list[int]]:
    from webui.server import trace

    return [call["active"] for call in trace(client)]


def same(one: Result, other: Result, within: int) -> bool:
    from webui.server import max_diff

    return len(one.images) == len(other.images) and all(
        max_diff(a, b) <= within for a, b in zip(one.images, other.images, strict=True)
    )


def noise_floor_reference(
    client: WebuiClient, prompts: tuple[str, str] = (A_UNET, A_UNET_SWAPPED), **extra: Any
) -> Result:
    """The first prompt's image (by default mlA alone in the UNet), made two exact ways (the tags swapped), within the
    noise floor of each other."""
    from webui.server import NOISE_FLOOR

    reference = detail(client, prompts[0], **extra)
    assert same(reference, detail(client, prompts[1], **extra), NOISE_FLOOR), "too chaotic at this strength"
    return reference


# --- the checks ------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("by_default")
def test_by_default_the_detail_pass_runs_merged_and_the_infotext_says_so(ad: WebuiClient, box: Any, made: Made) -> None:
    plain = made.merge()
    composite = detail(ad, AB, ml={"method": "Composite"})
    assert active(ad) == [], "Multi-LoRA ran no call in ADetailer's pass"
    assert_only_the_face_changed(composite, box)
    assert same(composite, plain, 0), "the face is what it was without Multi-LoRA"
    assert "Multi-LoRA method: Composite" in composite.infotext
    assert MERGED in composite.infotext and "names multilora" in composite.infotext
    assert WARNING not in plain.infotext


@pytest.mark.usefixtures("opted_in")
def test_opted_in_every_method_runs_exactly_in_the_detail_pass(ad: WebuiClient, box: Any, made: Made) -> None:
    from webui.server import SAME, max_diff

    reference = noise_floor_reference(ad)
    steps = None
    for method in ("Composite", "Spatial"):
        result = detail(ad, A_AND_COPY, ml={"method": method})
        calls = active(ad)
        steps = len(calls)
        assert steps >= 2 and calls == [[0, 1]] * steps, f"{method} ran in ADetailer's pass"
        assert_only_the_face_changed(result, box)
        assert same(result, reference, SAME), f"{method} over mlA and its copy is mlA, in the face too"
        assert f"Multi-LoRA method: {method}" in result.infotext and WARNING not in result.infotext
    first = noise_floor_reference(ad, prompts=(B_UNET, B_UNET_SWAPPED))
    switch = detail(ad, BA, ml={"method": "Switch", "tau": STEPS})
    assert active(ad) == [[0]] * steps
    assert same(switch, first, SAME), "Switch with tau >= steps is the first LoRA alone"
    composite = made.composite_in_detail_pass()
    assert max_diff(composite.image, made.merge().image) > SAME, "Composite's face is not Merge's"


@pytest.mark.usefixtures("opted_in")
def test_the_detail_pass_composes_the_loras_of_its_own_prompt(ad: WebuiClient, box: Any, made: Made) -> None:
    from webui.server import SAME, max_diff

    own = f"a face <lora:mlB:0.5> <lora:{B_COPY}:0.5>"
    reference = detail(ad, AB, tabs=({"ad_prompt": f"a face <lora:mlB:0.5> <lora:{B_COPY}:0.5:0>"},))
    composite = detail(ad, AB, ml={"method": "Composite"}, tabs=({"ad_prompt": own},))
    calls = active(ad)
    assert calls and calls == [[0, 1]] * len(calls)
    assert same(composite, reference, SAME), "Composite over ad_prompt's mlB and its copy is its mlB"
    assert max_diff(composite.image, made.composite_in_detail_pass().image) > SAME, "not the outer prompt's LoRAs"
    assert_only_the_face_changed(composite, box)
    untagged = detail(ad, AB, ml={"method": "Composite"}, tabs=({"ad_prompt": "a face"},))
    assert "Multi-LoRA method: Composite" in untagged.infotext
    assert "ADetailer's detail pass: " in untagged.infotext, "the face pass's warning reaches the image's infotext"


@pytest.mark.usefixtures("opted_in")
def test_xyz_cells_reach_the_detail_pass(ad: WebuiClient, made: Made, ad_reforge: bool) -> None:
    from webui.server import SAME, max_diff

    x_type = axis_index(ad, "[Multi-LoRA] Method", img2img=True)
    script_args = xyz_args(x_type, "Merge, Composite", reforge=ad_reforge)
    grid = detail(ad, AB, script_name="x/y/z plot", script_args=script_args)
    merge, composite = grid.images[1:]
    assert max_diff(merge, made.merge().image) == 0, "the Merge cell's face is Merge's"
    assert max_diff(composite, made.composite_in_detail_pass().image) <= SAME, "the Composite cell's face"
    assert "Multi-LoRA method: Merge" in grid.info["infotexts"][1]
    assert "Multi-LoRA method: Composite" in grid.info["infotexts"][2]


@pytest.mark.usefixtures("opted_in")
def test_a_batch_of_two_through_two_adetailer_tabs(ad: WebuiClient, box: Any) -> None:
    from webui.server import SAME

    tabs = ({}, {"ad_model": "mediapipe_face_full", "ad_denoising_strength": 0.3})
    reference = noise_floor_reference(ad, tabs=tabs, batch_size=2)
    composite = detail(ad, A_AND_COPY, ml={"method": "Composite"}, tabs=tabs, batch_size=2)
    assert len(composite.images) == 2
    assert_only_the_face_changed(composite, box)
    assert same(composite, reference, SAME), "each image's two passes over the face are mlA's"


@pytest.mark.usefixtures("opted_in")
def test_no_trace_after_detail_passes_interrupts_included(ad: WebuiClient) -> None:
    def plain() -> Result:
        return detail(ad, AB)

    before = snapshot(ad, plain)
    detail(ad, AB, ml={"method": "Switch", "tau": 1, "text_encoder": "First"})
    assert_no_trace(ad, plain, before)
    long = ({"ad_use_steps": True, "ad_steps": LONG_STEPS},)
    interrupted(ad, lambda client: detail(client, AB, ml={"method": "Composite"}, tabs=long), LONG_STEPS)
    assert_no_trace(ad, plain, before)
    scripts_in_detail_pass(ad, PROBES)
    detail(ad, AB, ml={"method": "Composite", "text_encoder": "First"})
    assert_no_trace(ad, plain, before)


def neighbours_dir(variable: str) -> Path | None:
    value = os.environ.get(variable, "").strip()
    return Path(value) if value else None
