"""Batched LoRA Composite (the batch replicated once per LoRA, one UNet call per denoiser call) in the real webui:
the same images as sequential Composite, and a pass hooks exactly the layers its LoRAs touch, or nothing at all.

"Same image" means max pixel difference <= 2/255, as in test_methods.py.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import pytest

from .helpers import PROMPT, STEPS, TITLE, require_tier
from .server import WebuiClient, assert_noise_floor, trace

if TYPE_CHECKING:
    from .server import Result
    from .tiny_lora import LoraInfo


require_tier()
np = pytest.importorskip("numpy")

pytestmark = pytest.mark.usefixtures("no_tracebacks")

EXECUTION_LABEL = "Multi-LoRA composite execution"


def composite(execution: str, enabled: bool = True) -> dict[str, Any]:
    """Positional script args: enabled, method, tau, loras, execution."""
    return {"alwayson_scripts": {TITLE: {"args": [enabled, "Composite", 5, "", execution]}}}


def tags(*loras: str) -> str:
    """At a strength where the noise floor (the merge with the LoRAs' order reversed) stays within 1/255: 0.5, or
    0.3 with the LoHa, whose random delta is stronger."""
    w = 0.3 if "mlLoha" in loras else 0.5
    return " ".join(f"<lora:{name}:{w}>" for name in loras)


def max_diff(a: Result, b: Result) -> int:
    """The largest pixel difference over every image of two results."""
    pairs = zip(a.images, b.images, strict=True)
    return max(int(np.abs(x.astype(np.int16) - y.astype(np.int16)).max()) for x, y in pairs)


@pytest.mark.parametrize(
    ("loras", "batch_size", "prompt"),
    [
        (("mlA", "mlB"), 1, PROMPT),
        (("mlA", "mlB", "mlC"), 1, PROMPT),
        (("mlA", "mlB"), 2, PROMPT),
        (("mlA", "mlB", "mlC"), 2, f"{PROMPT} AND a red ball :0.6"),
        (("mlA", "mlLocon", "mlLoha"), 1, PROMPT),  # conv and dense (LyCORIS) deltas beside stacked plain ones
    ],
    ids=["2-loras", "3-loras", "2-loras-batch2", "3-loras-batch2-AND", "lora-locon-loha"],
)
def test_batched_equals_sequential(webui: WebuiClient, loras: tuple[str, ...], batch_size: int, prompt: str) -> None:
    full = f"{prompt} {tags(*loras)}"
    sequential = webui.txt2img(prompt=full, steps=STEPS, batch_size=batch_size, **composite("Sequential"))
    batched = webui.txt2img(prompt=full, steps=STEPS, batch_size=batch_size, **composite("Batched"))
    calls = trace(webui)
    assert len(calls) == STEPS
    for c in calls:
        assert c["active"] == list(range(len(loras)))
        # the probe recomputes each LoRA's output with a sequential call: batching changes only float rounding
        assert c["diff_vs_mean"] <= 1e-4, c
        assert c["spread"] > 1e-3
    assert len(batched.images) == batch_size
    merge = webui.txt2img(prompt=full, steps=STEPS, batch_size=batch_size)
    reversed_merge = webui.txt2img(prompt=f"{prompt} {tags(*reversed(loras))}", steps=STEPS, batch_size=batch_size)
    for a, b in zip(merge.images, reversed_merge.images, strict=True):
        assert_noise_floor(a, b)
    assert max_diff(sequential, batched) <= 2
    assert f"{EXECUTION_LABEL}: Batched" in batched.infotext
    assert "Multi-LoRA warning" not in batched.infotext, "no fallback to sequential"
    assert EXECUTION_LABEL not in sequential.infotext, "the default is not written"


def test_auto_runs_sequentially_on_the_cpu(webui: WebuiClient) -> None:
    prompt = f"{PROMPT} {tags('mlA', 'mlB')}"
    sequential = webui.txt2img(prompt=prompt, steps=STEPS, **composite("Sequential"))
    auto = webui.txt2img(prompt=prompt, steps=STEPS, **composite("auto"))
    assert max_diff(sequential, auto) == 0
    assert f"{EXECUTION_LABEL}: Auto" in auto.infotext


def test_unknown_execution_warns_and_falls_back_to_plain(webui: WebuiClient) -> None:
    prompt = f"{PROMPT} {tags('mlA', 'mlB')}"
    plain = webui.txt2img(prompt=prompt, steps=STEPS)
    result = webui.txt2img(prompt=prompt, steps=STEPS, **composite("Parallel"))
    assert max_diff(plain, result) == 0
    assert "unknown execution 'Parallel'" in result.infotext


def test_enabled_with_nothing_to_compose_installs_nothing(webui: WebuiClient) -> None:
    disabled = webui.txt2img(prompt=PROMPT, steps=STEPS, **composite("Batched", enabled=False))
    before = webui.get("/multilora-probe/fingerprint")
    idle = webui.txt2img(prompt=PROMPT, steps=STEPS, **composite("Batched"))
    assert trace(webui) == [], "no wrapper ran"
    assert webui.get("/multilora-probe/fingerprint") == before
    assert max_diff(disabled, idle) == 0
    assert "no <lora" in idle.infotext and "Multi-LoRA method" not in idle.infotext


def hooks_during_pass(webui: WebuiClient, prompt: str, steps: int = 60) -> int:
    """Forward hooks on the model while a Composite pass is running (read between two progress polls that both see
    the pass in progress), from a second client that generates in the background."""
    generation = webui.get("/multilora-probe/progress")["generation"]
    background = WebuiClient(webui.server, timeout=300)
    errors: list[BaseException] = []

    def generate() -> None:
        try:
            background.txt2img(prompt=prompt, steps=steps, **composite("Batched"))
        except BaseException as e:  # surfaced by the caller
            errors.append(e)

    thread = threading.Thread(target=generate)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            progress = webui.get("/multilora-probe/progress")
            if progress["generation"] == generation + 1 and progress["calls"] >= 1:
                break
            time.sleep(0.05)
        fingerprint = webui.get("/multilora-probe/fingerprint")
        after = webui.get("/multilora-probe/progress")
        assert after["generation"] == generation + 1 and 1 <= after["calls"] < steps, "pass ended too soon"
    finally:
        thread.join()
        background.close()
    assert not errors, errors
    return int(fingerprint["hooks"])


def test_a_pass_hooks_only_the_layers_its_loras_touch(webui: WebuiClient, lora_infos: dict[str, LoraInfo]) -> None:
    baseline = webui.get("/multilora-probe/fingerprint")["hooks"]
    for loras in (("mlA", "mlB"), ("mlA", "mlLocon")):
        touched = set().union(*(lora_infos[name].unet_layers for name in loras))
        assert hooks_during_pass(webui, f"{PROMPT} {tags(*loras)}") == baseline + len(touched)
    assert webui.get("/multilora-probe/fingerprint")["hooks"] == baseline
