"""Multi-LoRA beside the extensions users run with it, in the real webui: LoRA Block Weight, Regional Prompter and
Mikubill's sd-webui-controlnet, unpacked in ``$SD_WEBUI_NEIGHBOURS`` and linked into a webui of this module's own
(the session's has none of them). Each check first shows that the neighbour acts on the tiny model (its image
differs from the one without it); a pass then either runs exactly beside it or is refused with a warning naming it.

Two computation paths are compared at LoRA strength 0.5 where the noise floor (the reference computed two exact
ways) is at most 1/255; "the same image" is then SAME (2/255).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hosts.tier import assert_no_trace, interrupted, snapshot

from .conftest import TIER
from .helpers import PROMPT, STEPS, TITLE, gen, require_tier
from .server import SAME, WebuiClient, WebuiServer, assert_noise_floor, encode_image, max_diff, mean_diff, trace

if TYPE_CHECKING:
    from .conftest import WebuiAssets
    from .server import Result

require_tier()
NEIGHBOURS_SKIP = "SD_WEBUI_NEIGHBOURS is not set: the neighbour extensions' tests are skipped"
if not os.environ.get("SD_WEBUI_NEIGHBOURS", "").strip():
    pytest.skip(NEIGHBOURS_SKIP, allow_module_level=True)
np = pytest.importorskip("numpy")

LBW, RP, CN = "sd-webui-lora-block-weight", "sd-webui-regional-prompter", "sd-webui-controlnet"
WARNING = "Multi-LoRA warning"


@pytest.fixture(scope="module")
def neighbours(webui_dir: Path, webui_assets: WebuiAssets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A webui with our extension, the probe and the three neighbours, on the session's model and LoRAs."""
    folder = Path(os.environ["SD_WEBUI_NEIGHBOURS"])
    server = WebuiServer(
        webui_dir=webui_dir,
        data_dir=tmp_path_factory.mktemp("webui-data-neighbours"),
        ckpt=webui_assets.ckpt,
        lora_dir=webui_assets.lora_dir,
    )
    with TIER.beside(server, folder, (LBW, RP, CN)) as client:
        yield client


@pytest.fixture(autouse=True)
def clean_log(neighbours: WebuiClient) -> Iterator[None]:
    """Fail a test whose webui logged a traceback while it ran."""
    with TIER.no_tracebacks(neighbours):
        yield


def ml(**named: Any) -> dict[str, Any]:
    """Our script's named args, enabled (merged into other ``alwayson_scripts`` by :func:`scripts`)."""
    return {TITLE: {"args": [{"enabled": True, **named}]}}


def scripts(*parts: dict[str, Any]) -> dict[str, Any]:
    """One request's ``alwayson_scripts`` from several scripts' args."""
    return {"alwayson_scripts": {key: value for part in parts for key, value in part.items()}}


def switch_first() -> dict[str, Any]:
    """Switch with tau >= steps: the first composed LoRA alone in the UNet, the whole run."""
    return ml(method="Switch", tau=STEPS)


# --------------------------------------------------------------------------------------------------------------------
# LoRA Block Weight
# --------------------------------------------------------------------------------------------------------------------

#: LBW's 17-block SD1 layout (BASE, IN01 IN02 IN04 IN05 IN07 IN08, M00, OUT03-OUT11): the transformer blocks, which
#: are where the test LoRAs are (the tiny model keeps SD1's blocks). The text encoder (BASE), the middle and the output
#: blocks at full weight, the input blocks off.
W = "1,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1,1"


def test_lbw_block_weights_act_on_the_test_model(neighbours: WebuiClient) -> None:
    weighted = gen(neighbours, f"{PROMPT} <lora:mlA:0.5:lbw={W}>")
    assert mean_diff(weighted.image, gen(neighbours, f"{PROMPT} <lora:mlA:0.5>").image) > SAME
    assert mean_diff(weighted.image, gen(neighbours, PROMPT).image) > SAME, "the input blocks' zero is not all"


@pytest.mark.parametrize("first", ["weighted", "plain"])
def test_switch_and_composite_run_one_lora_alone_in_the_unet_with_its_block_weights(
    neighbours: WebuiClient, first: str
) -> None:
    """The weighted LoRA active (its block weights act) or inactive (its block-weighted delta is what the pass takes
    away from the merged weights): Switch with tau >= steps over both, and Composite over the first alone, are the
    first LoRA alone in the UNet (the other one in the text encoder only)."""
    a, b, b_te = f"<lora:mlA:0.5:lbw={W}>", "<lora:mlB:0.5>", "<lora:mlB:0.5:0>"
    if first == "plain":
        a, b, b_te = "<lora:mlB:0.5>", f"<lora:mlA:0.5:lbw={W}>", f"<lora:mlA:0.5:0:lbw={W}>"
    reference = gen(neighbours, f"{PROMPT} {a} {b_te}")
    assert_noise_floor(reference.image, gen(neighbours, f"{PROMPT} {b_te} {a}").image)
    switch = gen(neighbours, f"{PROMPT} {a} {b}", **scripts(switch_first()))
    assert [c["active"] for c in trace(neighbours)] == [[0]] * STEPS
    assert max_diff(switch.image, reference.image) <= SAME
    assert mean_diff(switch.image, gen(neighbours, f"{PROMPT} {a} {b}").image) > SAME, "differs from Merge"
    name = "mlA" if first == "weighted" else "mlB"
    composite = gen(neighbours, f"{PROMPT} {a} {b_te}", **scripts(ml(method="Composite", loras=name)))
    assert [c["active"] for c in trace(neighbours)] == [[0]] * STEPS
    assert max_diff(composite.image, reference.image) <= SAME
    assert f"Multi-LoRA LoRAs: {name}," in composite.infotext and "_in_LBW_" not in composite.infotext


def test_block_weights_change_the_methods_image_and_the_infotext_names_loras_as_written(
    neighbours: WebuiClient,
) -> None:
    """LBW renames the loaded LoRAs ``mlA_in_LBW_0.123`` (a random suffix per generation): the infotext keeps the
    prompt's names, and pasting them back (the ``LoRAs to compose`` field) gives the same image."""
    weighted = f"{PROMPT} <lora:mlA:0.5:lbw={W}> <lora:mlB:0.5>"
    result = gen(neighbours, weighted, **scripts(ml(method="Composite")))
    plain = gen(neighbours, f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5>", **scripts(ml(method="Composite")))
    assert mean_diff(result.image, plain.image) > SAME
    composed = re.search(r'Multi-LoRA LoRAs: ("[^"]*"|[^,]*)', result.infotext)
    assert composed is not None and composed.group(1).strip('"') == "mlA, mlB", result.infotext
    assert "_in_LBW_" not in result.infotext
    pasted = gen(neighbours, weighted, **scripts(ml(method="Composite", loras=composed.group(1).strip('"'))))
    assert max_diff(pasted.image, result.image) == 0 and WARNING not in pasted.infotext


def test_lbw_step_controls_are_refused_with_a_warning_naming_lbw(neighbours: WebuiClient) -> None:
    stepped = f"{PROMPT} <lora:mlA:0.5:lbw={W}:stop=2> <lora:mlB:0.5>"
    plain = gen(neighbours, stepped)
    assert mean_diff(plain.image, gen(neighbours, f"{PROMPT} <lora:mlA:0.5:lbw={W}> <lora:mlB:0.5>").image) > SAME
    result = gen(neighbours, stepped, **scripts(ml(method="Composite")))
    assert "LoRA Block Weight's start/stop/step on mlA" in result.infotext
    assert "running without Multi-LoRA" in result.infotext and "Multi-LoRA method" not in result.infotext
    assert max_diff(result.image, plain.image) == 0


# --------------------------------------------------------------------------------------------------------------------
# Regional Prompter
# --------------------------------------------------------------------------------------------------------------------

#: Two columns, the cat left and the ball right.
REGIONS = f"{PROMPT} BREAK a red ball"


def rp(calc: str, active: bool = True, tab: str = "Matrix") -> dict[str, Any]:
    """Regional Prompter's positional args (its ``ui()`` order): active, debug, tab, matrix/mask/prompt submodes,
    divide ratios, base ratios, base/common/negative-common prompts, calc mode, options, negative LoRA ratios, prompt
    threshold, mask, LoRA stop steps, flip. Matrix: two columns; Prompt: regions where the target words attend."""
    args = [active, False, tab, "Columns", "Mask", "Prompt", "1,1", "0.2", False, False, False, calc, []]
    return {"Regional Prompter": {"args": [*args, "0", "0", "0.4", None, "0", "0", False]}}


def test_regional_prompter_attention_mode_runs_switch_and_composite(neighbours: WebuiClient) -> None:
    a, b_te = "<lora:mlA:0.5>", "<lora:mlB:0.5:0>"
    one = f"{REGIONS} {a}"
    plain = gen(neighbours, one, **scripts(rp("Attention")))
    assert mean_diff(plain.image, gen(neighbours, one, **scripts(rp("Attention", active=False))).image) > SAME
    assert "RP Active: True" in plain.infotext
    composite = gen(neighbours, one, **scripts(rp("Attention"), ml(method="Composite")))
    calls = trace(neighbours)  # cond and uncond run apart: RP's regions make the cond longer
    assert {c["step"] for c in calls} == set(range(STEPS)) and all(c["active"] == [0] for c in calls)
    assert max_diff(composite.image, plain.image) <= SAME and "RP Active: True" in composite.infotext
    reference = gen(neighbours, f"{REGIONS} {a} {b_te}", **scripts(rp("Attention")))
    assert_noise_floor(reference.image, gen(neighbours, f"{REGIONS} {b_te} {a}", **scripts(rp("Attention"))).image)
    switch = gen(neighbours, f"{REGIONS} {a} <lora:mlB:0.5>", **scripts(rp("Attention"), switch_first()))
    assert max_diff(switch.image, reference.image) <= SAME
    assert "Multi-LoRA method: Switch" in switch.infotext


def test_regional_prompter_attention_mode_runs_batched_composite_sequentially(neighbours: WebuiClient) -> None:
    two = f"{REGIONS} <lora:mlA:0.5> <lora:mlB:0.5>"
    sequential = gen(neighbours, two, **scripts(rp("Attention"), ml(method="Composite")))
    batched = gen(neighbours, two, **scripts(rp("Attention"), ml(method="Composite", execution="Batched")))
    assert "Regional Prompter's attention mode divides each call's rows" in batched.infotext
    assert "Hypertile" not in batched.infotext
    assert max_diff(batched.image, sequential.image) <= SAME


def test_regional_prompter_prompt_mode_runs_switch_and_refuses_composite(neighbours: WebuiClient) -> None:
    """Prompt mode builds its regions from the attention maps of every UNet call: Switch makes one call a step, as
    the webui does; Composite's several are refused."""
    targets = f"{PROMPT} and a ball BREAK ball"
    a, b_te = "<lora:mlA:0.5>", "<lora:mlB:0.5:0>"
    reference = gen(neighbours, f"{targets} {a} {b_te}", **scripts(rp("Attention", tab="Prompt")))
    off = gen(neighbours, f"{targets} {a} {b_te}", **scripts(rp("Attention", active=False, tab="Prompt")))
    assert mean_diff(reference.image, off.image) > SAME
    floor = gen(neighbours, f"{targets} {b_te} {a}", **scripts(rp("Attention", tab="Prompt")))
    assert_noise_floor(reference.image, floor.image)
    two = f"{targets} {a} <lora:mlB:0.5>"
    switch = gen(neighbours, two, **scripts(rp("Attention", tab="Prompt"), switch_first()))
    assert max_diff(switch.image, reference.image) <= SAME and "Multi-LoRA method: Switch" in switch.infotext
    plain = gen(neighbours, two, **scripts(rp("Attention", tab="Prompt")))
    composite = gen(neighbours, two, **scripts(rp("Attention", tab="Prompt"), ml(method="Composite")))
    assert "Regional Prompter's prompt mode builds its regions" in composite.infotext
    assert "Multi-LoRA method" not in composite.infotext and max_diff(composite.image, plain.image) == 0


def test_regional_prompter_latent_mode_is_refused_and_leaves_no_trace(neighbours: WebuiClient) -> None:
    two = f"{REGIONS} <lora:mlA:0.5> <lora:mlB:0.5>"

    def plain() -> Result:
        return gen(neighbours, two, **scripts(rp("Latent")))

    before = snapshot(neighbours, plain)
    attention = gen(neighbours, two, **scripts(rp("Attention")))
    assert mean_diff(before.images[0], attention.image) > SAME, "latent mode is its own image"
    result = gen(neighbours, two, **scripts(rp("Latent"), ml(method="Composite")))
    assert "Regional Prompter's latent mode applies the LoRAs per region itself" in result.infotext
    assert "Multi-LoRA method" not in result.infotext
    assert max_diff(result.image, before.images[0]) == 0
    assert trace(neighbours) == []
    assert_no_trace(neighbours, plain, before)


# --------------------------------------------------------------------------------------------------------------------
# ControlNet (Mikubill's sd-webui-controlnet)
# --------------------------------------------------------------------------------------------------------------------

CONTROLNET = "mlControl"
#: The ControlNet's output scale (probe_extension/scripts/multilora_controlnet.py): a clear change of the image that
#: keeps the noise floor of the comparisons within 1/255.
CONTROL_SCALE = 0.3


@pytest.fixture(scope="module")
def controlnet(neighbours: WebuiClient) -> str:
    """A random ControlNet for the tiny model, written into the extension's models folder by the probe."""
    neighbours.post("/multilora-probe/controlnet-model", {"name": CONTROLNET, "seed": 0, "scale": CONTROL_SCALE})
    assert CONTROLNET in str(neighbours.get("/controlnet/model_list")["model_list"])
    return CONTROLNET


def hint() -> np.ndarray:
    """A 64x64 hint: a white disc on black."""
    y, x = np.mgrid[:64, :64]
    disc = ((y - 24) ** 2 + (x - 36) ** 2 < 18**2).astype(np.uint8) * 255
    return np.repeat(disc[..., None], 3, axis=2)


def unit(model: str) -> dict[str, Any]:
    """One ControlNet unit: the hint as it is (preprocessor none), at full weight over every step."""
    return {
        "ControlNet": {
            "args": [
                {
                    "enabled": True,
                    "module": "none",
                    "model": model,
                    "image": encode_image(hint()),
                    "weight": 1.0,
                    "resize_mode": "Just Resize",
                    "processor_res": 64,
                    "pixel_perfect": False,
                    "guidance_start": 0.0,
                    "guidance_end": 1.0,
                    "control_mode": "Balanced",
                }
            ]
        }
    }


def controlled(client: WebuiClient, model: str, prompt: str, *parts: dict[str, Any], **payload: Any) -> Result:
    """txt2img (STEPS steps unless ``payload`` says) with the ControlNet unit and the other scripts' args ``parts``."""
    return client.txt2img(prompt=prompt, **{"steps": STEPS, **payload}, **scripts(unit(model), *parts))


def test_controlnet_acts_on_the_test_model(neighbours: WebuiClient, controlnet: str) -> None:
    with_unit = controlled(neighbours, controlnet, f"{PROMPT} <lora:mlA:0.5>")
    assert mean_diff(with_unit.image, gen(neighbours, f"{PROMPT} <lora:mlA:0.5>").image) > SAME
    assert "ControlNet 0" in with_unit.infotext


def test_composite_and_switch_with_a_controlnet_unit(neighbours: WebuiClient, controlnet: str) -> None:
    a, b_te = "<lora:mlA:0.5>", "<lora:mlB:0.5:0>"
    plain_a = controlled(neighbours, controlnet, f"{PROMPT} {a}")
    composite = controlled(neighbours, controlnet, f"{PROMPT} {a}", ml(method="Composite"))
    assert [c["active"] for c in trace(neighbours)] == [[0]] * STEPS
    reference = controlled(neighbours, controlnet, f"{PROMPT} {a} {b_te}")
    assert_noise_floor(reference.image, controlled(neighbours, controlnet, f"{PROMPT} {b_te} {a}").image)
    assert max_diff(composite.image, plain_a.image) <= SAME
    switch = controlled(neighbours, controlnet, f"{PROMPT} {a} <lora:mlB:0.5>", switch_first())
    assert max_diff(switch.image, reference.image) <= SAME
    assert "Multi-LoRA method: Switch" in switch.infotext


def test_batched_composite_with_a_controlnet_unit_equals_sequential(neighbours: WebuiClient, controlnet: str) -> None:
    """ControlNet reads each row's cond/uncond mark from its context and broadcasts the hint over the rows: the batch
    replicated per LoRA runs as one call (no fallback), a batch of two images included."""
    two = f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5>"
    sequential = controlled(neighbours, controlnet, two, ml(method="Composite"), batch_size=2)
    batched = controlled(neighbours, controlnet, two, ml(method="Composite", execution="Batched"), batch_size=2)
    calls = trace(neighbours)
    assert len(calls) == STEPS and all(c["diff_vs_mean"] <= 1e-4 and c["spread"] > 1e-3 for c in calls), calls
    assert len(batched.images) == len(sequential.images) >= 2
    for one, other in zip(batched.images, sequential.images, strict=True):
        assert max_diff(one, other) <= SAME
    assert "Multi-LoRA composite execution: Batched" in batched.infotext and WARNING not in batched.infotext


@pytest.mark.parametrize(("method", "passes"), [("Composite", 2), ("Spatial", 3)])
def test_a_step_computes_the_control_once_and_the_image_is_the_same(
    neighbours: WebuiClient, controlnet: str, method: str, passes: int
) -> None:
    """The passes of a call share the unit's control (the extension computes it inside each UNet forward): one
    ControlNet run per step, not one per pass, and bit for bit the image each pass computing its own makes."""
    two = f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5>"
    previous = neighbours.post("/multilora-probe/recompute", {"enabled": False})  # the trace's UNet calls
    neighbours.post("/multilora-probe/controlnet-runs")
    reused = controlled(neighbours, controlnet, two, ml(method=method))
    assert neighbours.get("/multilora-probe/controlnet-runs") == {"runs": STEPS, "wrapped": 0}
    neighbours.post("/sdapi/v1/options", {"multilora_controlnet_reuse": False})
    try:
        neighbours.post("/multilora-probe/controlnet-runs")
        computed = controlled(neighbours, controlnet, two, ml(method=method))
        assert neighbours.get("/multilora-probe/controlnet-runs")["runs"] == passes * STEPS
    finally:
        neighbours.post("/sdapi/v1/options", {"multilora_controlnet_reuse": True})
        neighbours.post("/multilora-probe/recompute", previous)
    assert max_diff(reused.image, computed.image) == 0


def test_no_trace_after_controlled_passes_finished_or_interrupted(neighbours: WebuiClient, controlnet: str) -> None:
    two = f"{PROMPT} <lora:mlA:0.5> <lora:mlB:0.5>"

    def plain() -> Result:
        return controlled(neighbours, controlnet, two)

    before = snapshot(neighbours, plain)
    controlled(neighbours, controlnet, two, ml(method="Switch", tau=1))
    assert_no_trace(neighbours, plain, before)
    interrupted(neighbours, lambda client: controlled(client, controlnet, two, ml(method="Composite"), steps=200), 200)
    assert_no_trace(neighbours, plain, before)
