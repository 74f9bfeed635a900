"""LoRA Switch and LoRA Composite inside a real Forge: the invariants of the paper's methods.

64x64 images, STEPS Euler steps, LoRAs at 0.5; "same image" and the noise floor as in helpers.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from hosts.tier import assert_each_call_is_the_mean
from webui.server import SAME, max_diff, mean_diff, trace

from .helpers import (
    A_UNET,
    AB,
    ABC,
    DIFFERENT,
    PROMPT,
    STEPS,
    assert_batched_is_sequential,
    gen,
    multilora,
    reference_within_floor,
)
from .server import SKIP_REASON, forge_dir_from_env

if TYPE_CHECKING:
    from webui.server import WebuiClient

    from .conftest import ForgeAssets

if forge_dir_from_env() is None:
    pytest.skip(SKIP_REASON, allow_module_level=True)

pytest.importorskip("numpy")


pytestmark = pytest.mark.usefixtures("no_tracebacks")


def test_each_lora_patches_every_layer_it_names(forge: WebuiClient, forge_assets: ForgeAssets) -> None:
    """Forge matched every module of every test LoRA, in the UNet and the text encoder: the files are what the tests
    think they are."""
    names = ("mlA", "mlB", "mlC", "mlLoha", "mlFull")
    gen(forge, PROMPT + "".join(f" <lora:{n}:0.5>" for n in names), steps=1)
    state = forge.get("/multilora-probe/fingerprint")
    assert [p[0] for p in state["next_unet_patches"]] == list(names)
    assert [p[4] for p in state["next_unet_patches"]] == [forge_assets.loras[n]["n_unet"] for n in names]
    with_te = [n for n in names if forge_assets.loras[n]["n_te"]]
    assert [p[0] for p in state["next_clip_patches"]] == with_te
    assert [p[4] for p in state["next_clip_patches"]] == [forge_assets.loras[n]["n_te"] for n in with_te]


def test_switch_with_tau_at_least_steps_equals_first_lora_in_unet(forge: WebuiClient) -> None:
    reference = reference_within_floor(forge, A_UNET, f"{PROMPT} <lora:mlB:0.5:0> <lora:mlA:0.5>")
    switch = gen(forge, AB, **multilora("Switch", tau=STEPS))
    assert [c["active"] for c in trace(forge)] == [[0]] * STEPS
    assert max_diff(reference, switch.image) <= SAME
    assert mean_diff(gen(forge, AB).image, switch.image) > DIFFERENT, "differs from Merge"


def test_a_lora_at_two_weights_is_composed_with_both_its_patch_sets(forge: WebuiClient) -> None:
    """Forge adds one patch set per distinct weight a LoRA is written with (the same weight twice is one): a composed
    LoRA is all of its patch sets, as Forge merges it."""
    twice = f"{PROMPT} <lora:mlA:0.3> <lora:mlA:0.2> <lora:mlB:0.5>"
    reference = reference_within_floor(forge, A_UNET, f"{PROMPT} <lora:mlA:0.3> <lora:mlA:0.2> <lora:mlB:0.5:0>")
    switch = gen(forge, twice, **multilora("Switch", tau=STEPS))
    assert [c["active"] for c in trace(forge)] == [[0]] * STEPS
    assert '"mlA, mlB"' in switch.infotext or "Multi-LoRA LoRAs: mlA, mlB" in switch.infotext
    assert max_diff(reference, switch.image) <= SAME


def test_switch_trace_follows_tau(forge: WebuiClient) -> None:
    result = gen(forge, ABC, **multilora("Switch", tau=2))
    calls = trace(forge)
    assert [c["step"] for c in calls] == list(range(STEPS))
    assert [c["active"] for c in calls] == [[(i // 2) % 3] for i in range(STEPS)]
    assert all(c["patched"] == ["mlA", "mlB", "mlC"] for c in calls), "plain LoRAs stay merged"
    assert "Multi-LoRA method: Switch" in result.infotext
    assert "Multi-LoRA switch every: 2" in result.infotext
    assert "got no step" not in result.infotext
    assert '"mlA, mlB, mlC"' in result.infotext or "Multi-LoRA LoRAs: mlA, mlB, mlC" in result.infotext


def test_switch_counts_steps_under_a_second_order_sampler(forge: WebuiClient) -> None:
    """Heun calls the model twice per step (once for the last): the schedule follows steps, not calls."""
    gen(forge, AB, sampler_name="Heun", **multilora("Switch", tau=1))
    calls = trace(forge)
    assert [c["step"] for c in calls] == [i // 2 for i in range(2 * STEPS - 1)]
    assert [c["active"] for c in calls] == [[c["step"] % 2] for c in calls]


def test_composite_over_one_lora_equals_plain_lora(forge: WebuiClient) -> None:
    # the same weight as two patch sets (0.3 + 0.2): Forge merges both, a mathematically equal reference
    reference = reference_within_floor(forge, f"{PROMPT} <lora:mlA:0.5>", f"{PROMPT} <lora:mlA:0.3> <lora:mlA:0.2>")
    composite = gen(forge, f"{PROMPT} <lora:mlA:0.5>", **multilora("Composite"))
    assert [c["active"] for c in trace(forge)] == [[0]] * STEPS, "the method ran every step"
    assert max_diff(reference, composite.image) <= SAME
    assert "only one LoRA" in composite.infotext


def test_composite_output_is_mean_of_single_lora_outputs_each_step(forge: WebuiClient) -> None:
    result = gen(forge, AB, **multilora("Composite"))
    assert_each_call_is_the_mean(trace(forge), STEPS)
    assert mean_diff(result.image, gen(forge, AB).image) > DIFFERENT, "Composite differs from Merge"


def test_batched_composite_equals_sequential(forge: WebuiClient) -> None:
    assert_batched_is_sequential(forge, gen, AB, f"{PROMPT} <lora:mlB:0.5> <lora:mlA:0.5>", STEPS)
