"""The Multi-LoRA panel as a user drives it in each host's real UI: pick a method, see only its controls, set them,
pick the LoRAs to compose among the prompt's, read the schedule picture, generate, read the infotext under the image,
paste it back into a fresh page with the webui's "Read generation parameters" button and find the panel as it was."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from webui.server import WebuiClient, trace

from lib_multilora.schedule import active_loras

from .driver import (
    CONTROLS,
    INPUTS,
    enable_hires,
    field_of,
    open_panel,
    options,
    panel,
    pick,
    picked,
    picture,
    preview,
    set_control,
    set_number,
    set_steps,
    settle,
    unet_passes,
)

if TYPE_CHECKING:
    from playwright.sync_api import Page

    from .conftest import Ui

PROMPT = "a portrait <lora:mlA:0.5> <lora:mlB:0.5>"
PROMPT3 = "a portrait <lora:mlA:0.5> <lora:mlB:0.5> <lora:mlC:0.5>"
#: Small and quick: set in the UI, and read back from the infotext to show they reached the generation.
SIZE, STEPS = 64, 4
#: A generation on two shared cores, Spatial (three UNet calls a step) on Forge's full-size text encoder included.
GENERATE_TIMEOUT_MS = 180_000
TITLE = "Multi-LoRA Composition"


@dataclass(frozen=True)
class Case:
    """One method: the controls the panel shows for it, the values the user sets (none a default, so a paste-back
    that misses one fails), the LoRAs picked (in the order clicked), the hires steps (None: no hires fix) and the
    ``Multi-LoRA`` entries the generation's infotext must carry, exactly."""

    method: str
    shown: frozenset[str]
    settings: dict[str, str]
    infotext: dict[str, str]
    prompt: str = PROMPT
    picks: tuple[str, ...] = ()
    hires_steps: int | None = None


CASES = (
    Case(
        "Switch",
        frozenset({"tau"}),
        {"tau": "2"},
        {"Multi-LoRA method": "Switch", "Multi-LoRA switch every": "2", "Multi-LoRA LoRAs": "mlA, mlC"},
        prompt=PROMPT3,
        picks=("mlC", "mlA"),
        hires_steps=3,  # the schedule restarts there: mlA, mlA, mlC
    ),
    Case(
        "Composite",
        frozenset({"execution", "weights"}),
        {"execution": "Batched", "weights": "2,1"},
        {
            "Multi-LoRA method": "Composite",
            "Multi-LoRA LoRAs": "mlA, mlB",
            "Multi-LoRA composite execution": "Batched",
            "Multi-LoRA composite weights": "2,1",
        },
    ),
    Case(
        "Spatial",
        frozenset({"execution", "weights", "patch", "temperature"}),
        {"patch": "4", "temperature": "0.1"},
        {
            "Multi-LoRA method": "Spatial",
            "Multi-LoRA LoRAs": "mlA, mlB",
            "Multi-LoRA spatial patch": "4",
            "Multi-LoRA spatial temperature": "0.1",
        },
    ),
)

#: One ``key: value`` entry of an infotext's parameter line; a value with a comma is written JSON-quoted.
ENTRY = re.compile(r'(?:^|, )(\w[\w \-/]*): ("(?:\\.|[^"\\])*"|[^,]*)')


def entries(infotext: str) -> dict[str, str]:
    """The entries of the infotext's last line (its parameters), quoted values unquoted."""
    line = infotext.strip().splitlines()[-1]
    return {key: json.loads(value) if value.startswith('"') else value for key, value in ENTRY.findall(line)}


def ours(params: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in params.items() if k.startswith("Multi-LoRA")}


def expected_picture(
    names: list[str],
    method: str,
    steps: int,
    tau: int = 5,
    weights: list[float] | None = None,
    window: tuple[float, float] | None = None,
    hires_steps: int | None = None,
    hires: str = "Restart",
) -> dict[tuple[str, int, str], tuple[str, str | None]]:
    """The cells as ``schedule.py`` (``active_loras``, the method wrapper's rule) has each step run, over the passes
    as the run counts them: the first pass from 0; the hires pass from 0 (Restart), after the first pass (Continue,
    its window over both) or merged (Off)."""
    passes = [("first", steps, 0)]
    if hires_steps is not None:
        passes.append(("hires", hires_steps, {"Restart": 0, "Continue": steps, "Off": None}[hires]))
    out: dict[tuple[str, int, str], tuple[str, str | None]] = {}
    for name, count, offset in passes:
        for step in range(count):
            run = []
            if offset is not None:
                run = active_loras(offset + step, offset + count, method, len(names), tau, weights, window)
            for k, lora in enumerate(names):
                if not run:
                    out[(name, step, lora)] = ("merged", None)
                elif k in run:
                    weight = 1.0 if method == "Switch" else (weights[k] if weights else 1 / len(names))
                    out[(name, step, lora)] = ("run", f"{weight:.4g}")
                else:  # Switch: another LoRA's step; Composite: weight 0, not run
                    out[(name, step, lora)] = ("wait", None) if method == "Switch" else ("skipped", "0")
    return out


def ran(calls: list[dict[str, Any]]) -> list[list[tuple[int, tuple[int, ...]]]]:
    """The trace of a generation as passes of (step, LoRAs run): a pass restarts its count (hires pass Restart)."""
    passes: list[list[tuple[int, tuple[int, ...]]]] = []
    for call in calls:
        entry = (call["step"], tuple(call["active"]))
        if not passes or entry[0] < passes[-1][-1][0]:
            passes.append([entry])
        elif entry != passes[-1][-1]:  # a step's other calls (cond and uncond apart) ran the same
            passes[-1].append(entry)
    return passes


def drawn(
    cells: dict[tuple[str, int, str], tuple[str, str | None]], names: list[str]
) -> list[list[tuple[int, tuple[int, ...]]]]:
    """The picture as passes of (step, LoRAs drawn running)."""
    out: dict[str, list[tuple[int, tuple[int, ...]]]] = {}
    for (name, step, _), _state in sorted(cells.items()):
        if not out.get(name) or out[name][-1][0] != step:
            run = tuple(k for k, lora in enumerate(names) if cells[(name, step, lora)][0] == "run")
            out.setdefault(name, []).append((step, run))
    return [out[name] for name in ("first", "hires") if name in out]


def expect_panel(page: Page, case: Case) -> None:
    """The panel is on, shows ``case``'s method with only its controls, and holds its values."""
    from playwright.sync_api import expect

    expect(page.locator("#txt2img_multilora-visible-checkbox")).to_be_checked()
    expect(panel(page, "method").get_by_label(case.method, exact=True)).to_be_checked()
    for name in CONTROLS:
        if name in case.shown:
            expect(panel(page, name)).to_be_visible()
        else:
            expect(panel(page, name)).to_be_hidden()
    for name, value in case.settings.items():
        if INPUTS[name] == "radio":
            expect(panel(page, name).get_by_label(value, exact=True)).to_be_checked()
        else:
            expect(field_of(page, name)).to_have_value(value)


@pytest.mark.parametrize("case", CASES, ids=[case.method for case in CASES])
def test_method_controls_generate_and_paste_back(open_page: Callable[[], Page], ui: Ui, case: Case) -> None:
    from playwright.sync_api import expect

    page = open_page()
    page.locator("#txt2img_prompt textarea").fill(case.prompt)
    for name in ("width", "height"):
        set_number(page.locator(f"#txt2img_{name} input[type=number]"), str(SIZE))
    set_steps(page, STEPS)
    if case.hires_steps is not None:
        enable_hires(page, case.hires_steps)
    open_panel(page)
    panel(page, "method").get_by_label(case.method, exact=True).check()
    for name in case.picks:
        pick(page, name)
    composed = case.infotext["Multi-LoRA LoRAs"]
    # a pick writes the LoRAs to compose, in prompt order
    expect(field_of(page, "loras")).to_have_value(", ".join(n for n in ("mlA", "mlB", "mlC") if n in case.picks))
    for name, value in case.settings.items():
        set_control(page, name, value)
    expect_panel(page, case)
    if case.picks:  # the picture the user sees before generating is what runs (the probe's trace, below)
        names = composed.split(", ")
        tau = int(case.settings["tau"])
        expected = expected_picture(names, case.method, STEPS, tau, hires_steps=case.hires_steps)
        settle(lambda: picture(page), expected, "the picture before generating")

    page.locator("#txt2img_generate").click()
    info = page.locator("#html_info_txt2img").last  # gradio 3 gives its wrapper and its text the same id
    expect(info).to_contain_text(f"Multi-LoRA method: {case.method}", timeout=GENERATE_TIMEOUT_MS)
    infotext = info.inner_text()
    params = entries(infotext)
    assert ours(params) == case.infotext, infotext
    assert (params["Steps"], params["Size"]) == (str(STEPS), f"{SIZE}x{SIZE}"), infotext
    assert infotext.strip().splitlines()[0] == case.prompt

    if case.picks:
        client = WebuiClient(ui.server)
        try:
            assert ran(trace(client)) == drawn(picture(page), names), "the picture is what ran, step by step"
            # the same names typed (the API's string, in another order) write the same infotext
            typed = client.txt2img(
                prompt=case.prompt,
                steps=STEPS,
                alwayson_scripts={TITLE: {"args": [True, case.method, tau, ", ".join(reversed(names))]}},
            )
        finally:
            client.close()
        assert ours(entries(typed.infotext)) == ours(params), typed.infotext

    fresh = open_page()
    expect(fresh.locator("#txt2img_multilora-visible-checkbox")).not_to_be_checked()
    fresh.locator("#txt2img_prompt textarea").fill(infotext)
    fresh.locator("#txt2img_tools #paste").click()
    # the paste goes through the webui's queue: on two busy cores it can outlast expect's 5 s
    expect(fresh.locator("#txt2img_prompt textarea")).to_have_value(case.prompt, timeout=GENERATE_TIMEOUT_MS)
    expect_panel(fresh, case)
    expect(field_of(fresh, "loras")).to_have_value(composed)
    settle(lambda: picked(fresh), composed.split(", "), "the paste-back restores the picks")


def test_the_picker_and_the_schedule_picture_follow_the_prompt_and_the_controls(open_page: Callable[[], Page]) -> None:
    """Without generating: the picker's choices follow the prompt (txt2img and img2img), the preview and the picture
    follow every control that changes the schedule (method, τ, weights, window, steps, hires fix, hires mode, img2img's
    denoising strength), and a name to compose that is not in the prompt is said."""
    page = open_page()
    names = ["mlA", "mlB", "mlC"]
    page.locator("#txt2img_prompt textarea").fill(PROMPT3)
    set_steps(page, 10)
    open_panel(page)
    settle(lambda: options(page), names, "the picker offers the prompt's LoRAs")
    page.locator("#txt2img_prompt textarea").fill("a portrait <lora:mlC:0.5>, <lora:mlA:0.5:lbw=OUTALL>")
    settle(lambda: options(page), ["mlC", "mlA"], "the choices follow the prompt")
    page.locator("#txt2img_prompt textarea").fill(PROMPT3)

    # Switch, τ 2, in a window of 20% to 80% of 10 steps
    set_control(page, "tau", "2")
    set_control(page, "start", "0.2")
    set_control(page, "end", "0.8")
    switch = expected_picture(names, "Switch", 10, 2, window=(0.2, 0.8))
    settle(lambda: picture(page), switch, "Switch in a window")
    assert "Switch every 2 of 10 steps: mlA: 2-3 | mlB: 4-5 | mlC: 6-7 Steps 2-7 only" in preview(page)

    # Composite, weights 2,0,1 (mlB skipped), in the first half
    panel(page, "method").get_by_label("Composite", exact=True).check()
    set_control(page, "weights", "2,0,1")
    set_control(page, "start", "0")
    set_control(page, "end", "0.5")
    weighted = expected_picture(names, "Composite", 10, weights=[2 / 3, 0, 1 / 3], window=(0, 0.5))
    settle(lambda: picture(page), weighted, "Composite with weights and a window")
    settle(lambda: unet_passes(page), [("first", i, 2 if i < 5 else 1) for i in range(10)], "UNet passes per step")
    assert "weighted mean of mlA 0.67 | mlB 0.00 | mlC 0.33; weight 0 skips mlB" in preview(page)
    set_control(page, "weights", "1,2")
    settle(
        lambda: "Warning: composite weights '1,2': 2 weight(s) for 3" in preview(page), True, "a wrong weights field"
    )

    # the hires fix, its pass continuing the first pass's count: Switch τ 3 in a window over both passes
    panel(page, "method").get_by_label("Switch", exact=True).check()
    set_control(page, "tau", "3")
    set_control(page, "start", "0.1")
    set_control(page, "end", "0.9")
    set_control(page, "hires", "Continue")
    enable_hires(page, 4)
    hires = expected_picture(names, "Switch", 10, 3, window=(0.1, 0.9), hires_steps=4, hires="Continue")
    settle(lambda: picture(page), hires, "Switch over a hires pass that continues the count")

    # a name typed that is not in the prompt: kept in the field, said, and the picture says why it is Merge
    field_of(page, "loras").fill("mlA, mlZ")
    settle(lambda: picked(page), ["mlA"], "the picker shows the typed names that are in the prompt")
    settle(lambda: "mlZ is not in the prompt" in preview(page), True, "the preview says mlZ is not in the prompt")
    fallback = panel(page, "schedule").locator("[data-fallback]")
    settle(lambda: "mlZ is not in the prompt" in fallback.inner_text(), True, "the picture says why it is Merge")

    # img2img: its own picker, and the picture counts the steps after the denoising strength (the webui's rule)
    page.locator("#tabs button", has_text="img2img").first.click()
    page.locator("#img2img_prompt textarea").fill("a portrait <lora:mlB:0.5> <lora:mlA:0.5>")
    open_panel(page, "img2img")
    settle(lambda: options(page, "img2img"), ["mlB", "mlA"], "img2img's picker follows its prompt")
    steps = int(page.locator("#img2img_steps input[type=number]").input_value())
    strength = float(page.locator("#img2img_denoising_strength input[type=number]").input_value())
    counted = int(min(strength, 0.999) * steps) + 1  # modules/sd_samplers_common.setup_img2img_steps, t_enc + 1
    settle(
        lambda: sorted({s for (_, s, _) in picture(page, "img2img")}), list(range(counted)), "img2img's counted steps"
    )
    assert f"{counted} of {steps} steps run" in panel(page, "schedule", "img2img").last.inner_text()
