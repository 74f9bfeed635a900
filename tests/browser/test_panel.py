"""The Multi-LoRA panel as a user drives it in the txt2img tab of each host's real UI: pick a method, see only its
controls, set them, generate, read the infotext under the image, paste it back into a fresh page with the webui's
"Read generation parameters" button and find the panel as it was."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

PROMPT = "a portrait <lora:mlA:0.5> <lora:mlB:0.5>"
#: Small and quick: set in the UI, and read back from the infotext to show they reached the generation.
SIZE, STEPS = 64, 4
#: A generation on two shared cores, Spatial (three UNet calls a step) on Forge's full-size text encoder included.
GENERATE_TIMEOUT_MS = 180_000

#: The panel's method-specific controls (lib_multilora/ui.py) and how each is set and read.
CONTROLS = {"tau": "number", "execution": "radio", "weights": "text", "patch": "number", "temperature": "number"}


@dataclass(frozen=True)
class Case:
    """One method: the controls the panel shows for it, the values the user sets (none a default, so a paste-back
    that misses one fails) and the ``Multi-LoRA`` entries the generation's infotext must carry, exactly."""

    method: str
    shown: frozenset[str]
    settings: dict[str, str]
    infotext: dict[str, str]


CASES = (
    Case(
        "Switch",
        frozenset({"tau"}),
        {"tau": "3"},
        {"Multi-LoRA method": "Switch", "Multi-LoRA switch every": "3", "Multi-LoRA LoRAs": "mlA, mlB"},
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


def panel(page: Page, name: str) -> Locator:
    return page.locator(f"#txt2img_multilora_{name}")


def field(page: Page, name: str) -> Locator:
    """The input of a control: its number box (a slider has one too) or its text box."""
    return panel(page, name).locator("input[type=number]" if CONTROLS[name] == "number" else "textarea")


def set_number(box: Locator, value: str) -> None:
    """Type a number and leave the box, as a user does: gradio takes the value on input or change."""
    box.fill(value)
    box.press("Tab")


def set_control(page: Page, name: str, value: str) -> None:
    if CONTROLS[name] == "radio":
        panel(page, name).get_by_label(value, exact=True).check()
    elif CONTROLS[name] == "number":
        set_number(field(page, name), value)
    else:
        field(page, name).fill(value)


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
        if CONTROLS[name] == "radio":
            expect(panel(page, name).get_by_label(value, exact=True)).to_be_checked()
        else:
            expect(field(page, name)).to_have_value(value)


@pytest.mark.parametrize("case", CASES, ids=[case.method for case in CASES])
def test_method_controls_generate_and_paste_back(open_page: Callable[[], Page], case: Case) -> None:
    from playwright.sync_api import expect

    page = open_page()
    page.locator("#txt2img_prompt textarea").fill(PROMPT)
    for name in ("width", "height"):
        set_number(page.locator(f"#txt2img_{name} input[type=number]"), str(SIZE))
    set_number(page.locator("#txt2img_steps input[type=number]"), str(STEPS))
    page.locator("#txt2img_multilora .label-wrap").click()  # opening the panel turns it on
    panel(page, "method").get_by_label(case.method, exact=True).check()
    for name, value in case.settings.items():
        set_control(page, name, value)
    expect_panel(page, case)

    page.locator("#txt2img_generate").click()
    info = page.locator("#html_info_txt2img").last  # gradio 3 gives its wrapper and its text the same id
    expect(info).to_contain_text(f"Multi-LoRA method: {case.method}", timeout=GENERATE_TIMEOUT_MS)
    infotext = info.inner_text()
    params = entries(infotext)
    assert {k: v for k, v in params.items() if k.startswith("Multi-LoRA")} == case.infotext, infotext
    assert (params["Steps"], params["Size"]) == (str(STEPS), f"{SIZE}x{SIZE}"), infotext
    assert infotext.strip().splitlines()[0] == PROMPT

    fresh = open_page()
    expect(fresh.locator("#txt2img_multilora-visible-checkbox")).not_to_be_checked()
    fresh.locator("#txt2img_prompt textarea").fill(infotext)
    fresh.locator("#txt2img_tools #paste").click()
    # the paste goes through the webui's queue: on two busy cores it can outlast expect's 5 s
    expect(fresh.locator("#txt2img_prompt textarea")).to_have_value(PROMPT, timeout=GENERATE_TIMEOUT_MS)
    expect_panel(fresh, case)
    expect(panel(fresh, "loras").locator("textarea")).to_have_value(case.infotext["Multi-LoRA LoRAs"])
