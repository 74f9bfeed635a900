"""Leave no trace on Forge: whatever happens to a Switch or Composite generation (it finishes, it is interrupted, it
fails inside the pass, it composes a LoHa through the dense path), Forge's model ends up exactly as a plain
generation of the same prompt leaves it (the probe's fingerprint: weights, hooks, patches, merged hashes, wrappers,
loaded networks), and the next plain image is bit-identical.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
from hosts.tier import assert_no_trace, interrupted, snapshot
from webui.server import DEFAULT_TXT2IMG, SAME, WebuiClient, max_diff, mean_diff, trace

from .helpers import (
    AB,
    DIFFERENT,
    PROMPT,
    STEPS,
    gen,
    multilora,
    reference_within_floor,
)
from .server import SKIP_REASON, forge_dir_from_env, traceback_count

if TYPE_CHECKING:
    from webui.server import Result, WebuiClient

if forge_dir_from_env() is None:
    pytest.skip(SKIP_REASON, allow_module_level=True)

pytest.importorskip("numpy")


clean = pytest.mark.usefixtures("no_tracebacks")

METHODS = ("Switch", "Composite")
LONG_STEPS = 200  # an interrupted run stops after a few of these; uninterrupted it would take about a minute
#: Printed by the fault probe (tests/webui/probe_extension/scripts/multilora_faults.py) when it raises.
FAULT_MESSAGE = "multilora probe: injected failure"
#: mlA and the LoHa composed, mlC merged as usual: with a LoHa among the composed every composed LoRA is taken out
#: of the pass's UNet patcher and each runs through its hook (Forge's own merge_lora_to_weight for the LoHa).
WITH_LOHA = f"{PROMPT} <lora:mlA:0.5> <lora:mlLoha:0.5> <lora:mlC:0.5>"


def plain(forge: WebuiClient, prompt: str = AB, **extra: Any) -> Callable[[], Result]:
    return lambda: gen(forge, prompt, **extra)


@clean
def test_finished_generation(forge: WebuiClient) -> None:
    """Plain LoRAs stay merged (the hooks subtract the inactive ones): the weights are never touched, and the
    pass's patcher clone, which Forge keeps loaded, keeps no wrapper. (Switch finishing: see the batch, hires and
    LoHa tests.)"""
    before = snapshot(forge, plain(forge))
    result = gen(forge, AB, **multilora("Composite"))
    calls = trace(forge)
    assert len(calls) == STEPS and all(c["patched"] == ["mlA", "mlB"] for c in calls)
    assert "Multi-LoRA method: Composite" in result.infotext
    assert_no_trace(forge, plain(forge), before)


@clean
@pytest.mark.parametrize("method", METHODS)
def test_interrupt_mid_pass(forge: WebuiClient, method: str) -> None:
    before = snapshot(forge, plain(forge))
    result = interrupted(
        forge, lambda client: client.txt2img(prompt=AB, steps=LONG_STEPS, **multilora(method, tau=1)), LONG_STEPS
    )
    assert f"Multi-LoRA method: {method}" in result.infotext
    assert_no_trace(forge, plain(forge), before)


@clean
def test_batch_and_iterations(forge: WebuiClient) -> None:
    """Forge resets its objects for every iteration: each one runs its own pass on the whole batch, and the last
    leaves nothing behind."""
    batch = {"batch_size": 2, "n_iter": 2, "steps": 4}
    before = snapshot(forge, plain(forge, **batch))
    result = gen(forge, AB, **batch, **multilora("Switch", tau=1))
    assert len(result.images) == 4
    assert [c["active"] for c in trace(forge)] == [[i % 2] for i in range(4)] * 2, "one pass per iteration"
    for image, merged in zip(result.images, before.images, strict=True):
        assert mean_diff(image, merged) > DIFFERENT, "differs from Merge"
    assert_no_trace(forge, plain(forge, **batch), before)


@pytest.mark.parametrize(
    ("method", "prompt", "loras"),
    [("Switch", AB, ""), ("Composite", AB, ""), ("Composite", WITH_LOHA, "mlA,mlLoha")],
    ids=["Switch", "Composite", "Composite-LoHa"],
)
def test_exception_inside_pass(forge: WebuiClient, method: str, prompt: str, loras: str) -> None:
    """The probe raises from inside the pass at step 3: the request fails, nothing else does."""
    before = snapshot(forge, plain(forge, prompt))
    mark = forge.log_mark()
    forge.post("/multilora-probe/fail-at", {"step": 3})
    body = {**DEFAULT_TXT2IMG, "prompt": prompt, "steps": STEPS, **multilora(method, tau=1, loras=loras)}
    # Forge's API-only server answers 500 and then drops the connection: not one the session may reuse
    response = forge.request("POST", "/sdapi/v1/txt2img", json=body, headers={"Connection": "close"})
    assert response.status_code == 500 and FAULT_MESSAGE in response.text
    assert [c["step"] for c in trace(forge)] == [0, 1, 2, 3]
    assert_no_trace(forge, plain(forge, prompt), before)
    # the only traceback in the log is the one the server logs for the injected fault
    log = forge.log_text(mark)
    assert traceback_count(log) == 1, log[-3000:]
    assert re.search(rf"^\s*RuntimeError: {FAULT_MESSAGE} at step 3$", log, re.M), log[-3000:]


@clean
def test_loha_among_the_composed_takes_them_out_and_switch_still_equals_the_first_alone(forge: WebuiClient) -> None:
    """The dense path: the pass's UNet patcher lacks mlA's and the LoHa's patches (mlC stays), mlA runs through its
    low-rank hook; with tau >= steps the image is mlA alone in the UNet, and nothing of the pass is left."""
    first_alone = f"{PROMPT} <lora:mlA:0.5> <lora:mlLoha:0.5:0> <lora:mlC:0.5>"
    reference = reference_within_floor(
        forge, first_alone, f"{PROMPT} <lora:mlLoha:0.5:0> <lora:mlA:0.5> <lora:mlC:0.5>"
    )
    before = snapshot(forge, plain(forge, WITH_LOHA))
    switch = gen(forge, WITH_LOHA, **multilora("Switch", tau=STEPS, loras="mlA,mlLoha"))
    calls = trace(forge)
    assert [c["active"] for c in calls] == [[0]] * STEPS
    assert all(c["patched"] == ["mlC"] for c in calls), calls[0]["patched"]
    assert max_diff(reference, switch.image) <= SAME
    assert mean_diff(before.images[0], switch.image) > DIFFERENT, "differs from Merge"
    assert_no_trace(forge, plain(forge, WITH_LOHA), before)


@clean
def test_loha_first_runs_through_forges_own_merge(forge: WebuiClient) -> None:
    """The LoHa as the active LoRA: its hook adds the delta Forge's merge_lora_to_weight computes for it."""
    loha_first = f"{PROMPT} <lora:mlLoha:0.5> <lora:mlA:0.5>"
    reference = reference_within_floor(
        forge, f"{PROMPT} <lora:mlLoha:0.5> <lora:mlA:0.5:0>", f"{PROMPT} <lora:mlA:0.5:0> <lora:mlLoha:0.5>"
    )
    before = snapshot(forge, plain(forge, loha_first))
    switch = gen(forge, loha_first, **multilora("Switch", tau=STEPS))
    assert [c["patched"] for c in trace(forge)] == [[]] * STEPS
    assert max_diff(reference, switch.image) <= SAME
    assert_no_trace(forge, plain(forge, loha_first), before)


@clean
def test_composite_with_a_loha_is_the_mean_and_leaves_no_trace(forge: WebuiClient) -> None:
    before = snapshot(forge, plain(forge, WITH_LOHA))
    result = gen(forge, WITH_LOHA, **multilora("Composite", loras="mlLoha,mlA"))
    calls = trace(forge)
    assert len(calls) == STEPS
    assert all(c["active"] == [0, 1] and c["diff_vs_mean"] <= 1e-5 and c["spread"] > 1e-3 for c in calls)
    assert "Multi-LoRA LoRAs: mlA, mlLoha" in result.infotext or '"mlA, mlLoha"' in result.infotext
    assert_no_trace(forge, plain(forge, WITH_LOHA), before)


@clean
def test_lycoris_full_and_norm_patch_a_layers_weight_and_bias_together(forge: WebuiClient) -> None:
    """mlFull patches the weight and the bias of every layer it touches (LyCORIS full and norm: Forge "diff"
    patches on both): the layer's dense delta holds both; with tau >= steps the image is mlFull alone in the UNet,
    and nothing is left."""
    prompt = f"{PROMPT} <lora:mlFull:0.5> <lora:mlA:0.5>"
    first_alone = f"{PROMPT} <lora:mlFull:0.5> <lora:mlA:0.5:0>"
    reference = reference_within_floor(forge, first_alone, f"{PROMPT} <lora:mlA:0.5:0> <lora:mlFull:0.5>")
    before = snapshot(forge, plain(forge, prompt))
    switch = gen(forge, prompt, **multilora("Switch", tau=STEPS))
    assert [c["patched"] for c in trace(forge)] == [[]] * STEPS, "every composed LoRA taken out of the patcher"
    assert max_diff(reference, switch.image) <= SAME
    assert mean_diff(before.images[0], switch.image) > DIFFERENT, "differs from Merge"
    assert_no_trace(forge, plain(forge, prompt), before)
