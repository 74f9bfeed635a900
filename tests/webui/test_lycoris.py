"""LyCORIS files written by the LyCORIS project's own library (lycoris-lora), composed in the real webui.

``lycoris_files.build_lycoris`` writes one file per algorithm on the tiny model's UNet (see its docstring). For each
type the built-in Lora extension applies, the methods hold their invariants with it: Composite over it alone is the
plain ``<lora>``, Switch with tau >= steps runs the first LoRA alone in the UNet, in both orders with a plain LoRA,
Composite with a plain LoRA is not Merge, and nothing is left behind. Where the built-in cannot apply what LyCORIS
writes, a test shows the host's limit.

Every file's deltas are a quarter of their layers' weights (lycoris_files.REL) and the tags weigh 0.5: the image
changes clearly, and the noise floor (the reference computed two exact ways: the plain LoRA's text-encoder part in
one mention or in two halves) stays within NOISE_FLOOR, measured in each test that compares two paths.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

from .helpers import PROMPT, STEPS, gen, ml, require_tier
from .server import SAME, assert_noise_floor, max_diff, mean_diff, trace
from .test_no_trace import assert_no_trace, plain, snapshot

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import WebuiAssets
    from .server import WebuiClient
    from .tiny_lora import LoraInfo

pytest.importorskip(
    "lycoris", reason="lycoris-lora is not installed (pip install lycoris-lora==4.1.3): LyCORIS file tests skipped"
)


require_tier()

pytestmark = pytest.mark.usefixtures("no_tracebacks")

W = 0.5
#: The types the built-in applies. GLoRA: the built-in's formula has an earlier LyCORIS factor layout, so every
#: layer's delta fails to compute (test_builtin_applies_no_glora_layer).
APPLIED = ("lycoLokr", "lycoLoha", "lycoTucker", "lycoDora", "lycoFull", "lycoIa3", "lycoOft", "lycoBoft", "lycoNorm")
#: The IA3 file's linear modules alone: the built-in's IA3 takes a conv's per-channel vector for a linear's
#: (test_builtin_applies_ia3_on_linears_only).
IA3_LINEAR = "lycoIa3Linear"


def _write_linear_part(source: Path, out: Path) -> int:
    """``out``: the IA3 file ``source`` without its conv modules (their vector is 4-D); returns how many it left out."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not a mapping
        metadata = fh.metadata() or {}
    convs = {k.rsplit(".", 1)[0] for k, v in tensors.items() if k.endswith(".weight") and v.dim() == 4}
    kept = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] not in convs}
    save_file(kept, str(out), metadata={**metadata, "ss_output_name": out.stem})
    return len(convs)


@dataclass(frozen=True)
class LycoFiles:
    """The files in the webui's LoRA dir, and how many of the IA3 file's modules are convs."""

    infos: dict[str, LoraInfo]
    ia3_convs: int

    def misfits(self, name: str) -> int:
        """Layers of the file whose delta the built-in's merge cannot add (the IA3 file's convs)."""
        return self.ia3_convs if name == "lycoIa3" else 0


@pytest.fixture(scope="module")
def lyco(webui: WebuiClient, webui_assets: WebuiAssets, webui_dir: Path) -> Iterator[LycoFiles]:
    """Every LyCORIS file in the running webui's LoRA dir (and the IA3 file's linear part); removed at the end."""
    from .lycoris_files import build_lycoris

    infos = build_lycoris(webui_assets.lora_dir, webui_assets.ckpt, seed=0, webui_dir=webui_dir)
    linear = webui_assets.lora_dir / f"{IA3_LINEAR}.safetensors"
    files = LycoFiles(infos, _write_linear_part(infos["lycoIa3"].path, linear))
    webui.post("/sdapi/v1/refresh-loras")
    try:
        yield files
    finally:
        for path in [linear, *(info.path for info in infos.values())]:
            path.unlink()
        webui.post("/sdapi/v1/refresh-loras")


@pytest.mark.parametrize("name", [*APPLIED, "lycoGlora"])
def test_every_module_loads(webui: WebuiClient, lyco: LycoFiles, name: str) -> None:
    info = lyco.infos[name]
    report = webui.probe_load([name])
    (loaded,) = report["loaded"]
    assert (loaded["n_unet_modules"], loaded["n_te_modules"]) == (info.n_unet_modules, 0)
    file_report = report["files"][name]
    assert file_report["unmatched_modules"] == [] and file_report["n_keys_failed_to_match"] == 0
    assert file_report["n_file_modules"] == info.n_unet_modules


@pytest.mark.parametrize("name", APPLIED)
def test_first_in_the_prompt_composite_alone_and_switch_are_it_alone(
    webui: WebuiClient, lyco: LycoFiles, name: str
) -> None:
    """Reference: the LyCORIS LoRA, and mlA in the text encoder only. Composite over the LyCORIS LoRA alone (mlA stays
    merged, its UNet part at 0) and Switch over both with tau >= steps must both make it."""
    reference = gen(webui, f"{PROMPT} <lora:{name}:{W}> <lora:mlA:{W}:0>")
    assert_noise_floor(
        reference.image, gen(webui, f"{PROMPT} <lora:{name}:{W}> <lora:mlA:{W / 2}:0> <lora:mlA:{W / 2}:0>").image
    )
    assert mean_diff(reference.image, gen(webui, f"{PROMPT} <lora:mlA:{W}:0>").image) > SAME, (
        "the file changes the image"
    )
    composite = gen(webui, f"{PROMPT} <lora:{name}:{W}> <lora:mlA:{W}:0>", **ml(method="Composite", loras=name))
    assert [c["active"] for c in trace(webui)] == [[0]] * STEPS
    assert max_diff(composite.image, reference.image) <= SAME
    misfit = f"{name}: {lyco.misfits(name)} UNet layer(s) do not fit this model"
    assert (misfit in composite.infotext) == (lyco.misfits(name) > 0), composite.infotext
    switch = gen(webui, f"{PROMPT} <lora:{name}:{W}> <lora:mlA:{W}>", **ml(method="Switch", tau=STEPS))
    calls = trace(webui)
    assert [c["active"] for c in calls] == [[0]] * STEPS
    assert all(c["loaded"] == [] for c in calls), "a LyCORIS type among the composed takes them out of the weights"
    assert max_diff(switch.image, reference.image) <= SAME


@pytest.mark.usefixtures("lyco")
@pytest.mark.parametrize("name", APPLIED)
def test_after_a_plain_lora_switch_runs_the_plain_one_alone(webui: WebuiClient, name: str) -> None:
    reference = gen(webui, f"{PROMPT} <lora:mlA:{W}> <lora:{name}:{W}:0>")  # the LyCORIS LoRA: text encoder only
    assert_noise_floor(
        reference.image, gen(webui, f"{PROMPT} <lora:mlA:{W / 2}> <lora:mlA:{W / 2}> <lora:{name}:{W}:0>").image
    )
    switch = gen(webui, f"{PROMPT} <lora:mlA:{W}> <lora:{name}:{W}>", **ml(method="Switch", tau=STEPS))
    assert [c["active"] for c in trace(webui)] == [[0]] * STEPS
    assert max_diff(switch.image, reference.image) <= SAME


@pytest.mark.usefixtures("lyco")
@pytest.mark.parametrize("name", APPLIED)
def test_composite_with_a_plain_lora_is_not_merge_and_leaves_no_trace(webui: WebuiClient, name: str) -> None:
    prompt = f"{PROMPT} <lora:{name}:{W}> <lora:mlA:{W}>"
    before = snapshot(webui, plain(webui, prompt))
    composite = gen(webui, prompt, **ml(method="Composite"))
    calls = trace(webui)
    assert len(calls) == STEPS
    for c in calls:
        assert c["active"] == [0, 1] and c["diff_vs_mean"] <= 1e-5, c
        assert c["spread"] > 1e-3, "the two LoRAs give different predictions"
    assert mean_diff(composite.image, before.images[0]) > SAME, "Composite differs from Merge"
    assert_no_trace(webui, plain(webui, prompt), before)
    gen(webui, prompt, **ml(method="Switch", tau=1))
    assert [c["active"] for c in trace(webui)] == [[i % 2] for i in range(STEPS)]
    assert_no_trace(webui, plain(webui, prompt), before)


# --------------------------------------------------------------------------------------------------------------------
# what the built-in cannot apply
# --------------------------------------------------------------------------------------------------------------------


def test_builtin_applies_no_glora_layer(webui: WebuiClient, lyco: LycoFiles) -> None:
    """Every module loads (test_every_module_loads), but the built-in computes GLoRA as ``b2 @ b1 + W @ a2 @ a1``
    with an earlier layout (a1/b1 the down factors); lycoris-lora 4 writes a1/b1 as the up factors, so each layer's
    delta raises a shape error and the merge leaves it out: the image is the one without the LoRA. Multi-LoRA leaves
    them out the same way, and says so."""
    none = gen(webui, PROMPT)
    assert max_diff(gen(webui, f"{PROMPT} <lora:lycoGlora:1>").image, none.image) == 0
    composite = gen(webui, f"{PROMPT} <lora:lycoGlora:1>", **ml(method="Composite"))
    n_layers = lyco.infos["lycoGlora"].n_unet_modules
    assert f"lycoGlora: {n_layers} UNet layer(s) do not fit this model" in composite.infotext, composite.infotext
    assert max_diff(composite.image, none.image) == 0


def test_builtin_applies_ia3_on_linears_only(webui: WebuiClient, lyco: LycoFiles) -> None:
    """lycoris-lora 4 stores a conv's IA3 vector as (1, out, 1, 1); the built-in reshapes it to (out, 1) and multiplies
    the 4-D weight with it, which fails (3x3) or broadcasts to another shape (1x1): the merge leaves every conv module
    out, and the image is the one of the file's linear modules alone."""
    assert lyco.ia3_convs > 0
    full = gen(webui, f"{PROMPT} <lora:lycoIa3:{W}>")
    assert max_diff(full.image, gen(webui, f"{PROMPT} <lora:{IA3_LINEAR}:{W}>").image) == 0
    assert mean_diff(full.image, gen(webui, PROMPT).image) > SAME, "the linear modules apply"
