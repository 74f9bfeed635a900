"""Multi-LoRA beside LoRA Block Weight in a real Forge: LBW (unpacked in ``$SD_FORGE_NEIGHBOURS``, on reForge
``$SD_REFORGE_NEIGHBOURS``, linked into a Forge of this module's own) rewrites each UNet and text-encoder patch's
strength by the block its key falls in, and a pass composes the patches as LBW left them; its step controls are
refused, with a warning naming it.

The Forge tier's tiny model has one UNet level (``input_blocks.1``, ``middle_block``, ``output_blocks.0``/``.1``,
each a res block and a transformer), where the test LoRAs patch the transformers: LBW's keys ``IN01``, ``M00``,
``OUT00`` and ``OUT01``, which only its 26-block form addresses (the 17- and 12-block SD presets leave ``OUT00`` and
``OUT01`` out, at 0). LoRAs at 0.5, "the same image" and the noise floor as in helpers.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from webui.server import SAME, WebuiClient, max_diff, mean_diff, trace

from .conftest import TIER
from .helpers import DIFFERENT, PROMPT, STEPS, gen, ml, reference_within_floor
from .server import HOST_LABEL, REFORGE, SKIP_REASON, ForgeServer, forge_dir_from_env, neighbours_dir_from_env

if TYPE_CHECKING:
    from .conftest import ForgeAssets

if forge_dir_from_env() is None:
    pytest.skip(SKIP_REASON, allow_module_level=True)
NEIGHBOURS = neighbours_dir_from_env()
if NEIGHBOURS is None:
    reason = f"no {HOST_LABEL} neighbours (tests.hosts setup): the LoRA Block Weight tests are skipped"
    pytest.skip(reason, allow_module_level=True)
pytest.importorskip("numpy")

LBW = "sd-webui-lora-block-weight"
#: 26 blocks: BASE (the text encoder), IN00-IN11, M00, OUT00-OUT11. The middle block and OUT00 at full weight,
#: IN01 and OUT01 off.
W = ",".join(["1"] + ["0"] * 12 + ["1", "1"] + ["0"] * 11)


@pytest.fixture(scope="module")
def forge_lbw(forge_dir: Path, forge_assets: ForgeAssets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Forge with our extension, the probe and LoRA Block Weight, on the session's model and LoRAs."""
    server = ForgeServer(forge_dir, tmp_path_factory.mktemp("forge-data-lbw"), forge_assets.ckpt, forge_assets.lora_dir)
    with TIER.beside(server, NEIGHBOURS, (LBW,)) as client:
        yield client


@pytest.fixture(autouse=True)
def clean_log(forge_lbw: WebuiClient) -> Iterator[None]:
    """Fail a test whose Forge logged a traceback while it ran."""
    with TIER.no_tracebacks(forge_lbw):
        yield


def test_block_weights_act_on_the_test_model(forge_lbw: WebuiClient) -> None:
    weighted = gen(forge_lbw, f"{PROMPT} <lora:mlA:0.5:lbw={W}>")
    assert mean_diff(weighted.image, gen(forge_lbw, f"{PROMPT} <lora:mlA:0.5>").image) > DIFFERENT
    assert mean_diff(weighted.image, gen(forge_lbw, PROMPT).image) > DIFFERENT, "the zeroed blocks are not all"


def equal_other_way(first: str, then: str, first_split: str) -> str:
    """The reference ``first then`` computed another equal way, for the noise floor: the tags the other way round
    (Forge), or the first LoRA as two patch sets that sum to it (``first_split``: reForge, where LBW gives each
    key's patches the tags' block weights in tag order, so a tag that patches no UNet key, such as a text-encoder-only
    one, puts its UNet weight, 0, on the next tag's patches)."""
    return f"{PROMPT} {first_split} {then}" if REFORGE else f"{PROMPT} {then} {first}"


def test_composite_over_a_block_weighted_lora_equals_it(forge_lbw: WebuiClient) -> None:
    a = f"<lora:mlA:0.5:lbw={W}>"
    weighted = f"{PROMPT} {a}"
    split = f"<lora:mlA:0.3:lbw={W}> <lora:mlA:0.2:lbw={W}>"
    reference_within_floor(forge_lbw, f"{weighted} <lora:mlB:0.5:0>", equal_other_way(a, "<lora:mlB:0.5:0>", split))
    reference = gen(forge_lbw, weighted)
    composite = gen(forge_lbw, weighted, **ml(method="Composite"))
    assert [c["active"] for c in trace(forge_lbw)] == [[0]] * STEPS
    assert max_diff(composite.image, reference.image) <= SAME
    assert "Multi-LoRA LoRAs: mlA" in composite.infotext


@pytest.mark.parametrize("first", ["weighted", "plain"])
def test_switch_runs_the_first_lora_alone_in_the_unet_with_its_block_weights(
    forge_lbw: WebuiClient, first: str
) -> None:
    """The weighted LoRA active (its weighted patches act) or inactive (its weighted delta is what the pass takes
    away from the merged weights)."""
    a, b, b_te = f"<lora:mlA:0.5:lbw={W}>", "<lora:mlB:0.5>", "<lora:mlB:0.5:0>"
    split = f"<lora:mlA:0.3:lbw={W}> <lora:mlA:0.2:lbw={W}>"
    if first == "plain":
        a, b, b_te = "<lora:mlB:0.5>", f"<lora:mlA:0.5:lbw={W}>", f"<lora:mlA:0.5:0:lbw={W}>"
        split = "<lora:mlB:0.3> <lora:mlB:0.2>"
    reference = reference_within_floor(forge_lbw, f"{PROMPT} {a} {b_te}", equal_other_way(a, b_te, split))
    switch = gen(forge_lbw, f"{PROMPT} {a} {b}", **ml(method="Switch", tau=STEPS))
    assert [c["active"] for c in trace(forge_lbw)] == [[0]] * STEPS
    assert max_diff(switch.image, reference) <= SAME
    assert mean_diff(switch.image, gen(forge_lbw, f"{PROMPT} {a} {b}").image) > DIFFERENT, "differs from Merge"


@pytest.mark.parametrize("method", ["Switch", "Composite"])
def test_block_weights_change_the_methods_image(forge_lbw: WebuiClient, method: str) -> None:
    args = ml(method=method, tau=1)
    weighted = gen(forge_lbw, f"{PROMPT} <lora:mlA:0.5:lbw={W}> <lora:mlB:0.5>", **args)
    assert mean_diff(weighted.image, gen(forge_lbw, f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5>", **args).image) > SAME
    assert "Multi-LoRA LoRAs: mlA, mlB" in weighted.infotext or '"mlA, mlB"' in weighted.infotext


def test_lbw_step_controls_are_refused_with_a_warning_naming_lbw(forge_lbw: WebuiClient) -> None:
    """Refused, the generation is LBW's own. (On this Forge, LBW's step controls do not act on the tiny model: its own
    image with ``stop=3`` or ``start=3`` is within 1/255 of the one without, except that the first ``start`` after
    another prompt leaves the LoRA out all along; so the reference is made right before, after the same prompt.)"""
    stepped = f"{PROMPT} <lora:mlA:0.5:lbw={W}:stop=3> <lora:mlB:0.5>"
    lbw = gen(forge_lbw, stepped)
    assert mean_diff(lbw.image, gen(forge_lbw, f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5>").image) > DIFFERENT
    gen(forge_lbw, stepped)
    plain = gen(forge_lbw, stepped)
    for method in ("Switch", "Composite"):
        result = gen(forge_lbw, stepped, **ml(method=method))
        assert "LoRA Block Weight's start/stop/step on mlA" in result.infotext
        assert "running without Multi-LoRA" in result.infotext and "Multi-LoRA method" not in result.infotext
        assert max_diff(result.image, plain.image) == 0
