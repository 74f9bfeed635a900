"""Driving the Multi-LoRA panel in a host's real UI with Playwright, as a user does: the browser tier
(``test_panel.py``) and ``docs/screenshot.py`` share these steps."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

#: How long the panel may take to answer a change (a server round trip through the webui's queue, on busy cores).
SETTLE_S = 60

#: The panel's method-specific controls (lib_multilora/ui.py) and how each is set and read.
CONTROLS = {"tau": "number", "execution": "radio", "weights": "text", "patch": "number", "temperature": "number"}
#: The other controls the tests set.
INPUTS = {"start": "number", "end": "number", "hires": "radio", "loras": "text", **CONTROLS}


def panel(page: Page, name: str, tab: str = "txt2img") -> Locator:
    return page.locator(f"#{tab}_multilora_{name}")


def field_of(page: Page, name: str) -> Locator:
    """The input of a control: its number box (a slider has one too) or its text box."""
    return panel(page, name).locator("input[type=number]" if INPUTS[name] == "number" else "textarea")


def set_number(box: Locator, value: str) -> None:
    """Type a number and leave the box, as a user does: gradio takes the value on input or change."""
    box.fill(value)
    box.press("Tab")


def set_control(page: Page, name: str, value: str) -> None:
    if INPUTS[name] == "radio":
        panel(page, name).get_by_label(value, exact=True).check()
    elif INPUTS[name] == "number":
        set_number(field_of(page, name), value)
    else:
        field_of(page, name).fill(value)


def set_steps(page: Page, steps: int, tab: str = "txt2img") -> None:
    set_number(page.locator(f"#{tab}_steps input[type=number]"), str(steps))


def open_panel(page: Page, tab: str = "txt2img") -> None:
    page.locator(f"#{tab}_multilora .label-wrap").click()  # opening the panel turns it on


def enable_hires(page: Page, steps: int) -> None:
    """Open the hires fix (which turns it on) and set its steps."""
    page.locator("#txt2img_hr .label-wrap").click()
    set_number(page.locator("#txt2img_hires_steps input[type=number]"), str(steps))


def settle(read: Callable[[], Any], expected: Any, what: str) -> None:
    """Wait until ``read()`` gives ``expected`` (the panel answers changes through the server), then check it."""
    deadline = time.monotonic() + SETTLE_S
    while time.monotonic() < deadline and read() != expected:
        time.sleep(0.25)
    assert read() == expected, what


def options(page: Page, tab: str = "txt2img") -> list[str]:
    """The picker's choices, as its open list shows them (then closed again)."""
    picker = panel(page, "picks", tab)
    picker.locator("input").click()
    choices = picker.locator('[data-testid="dropdown-option"]').evaluate_all(
        "els => els.map(e => e.getAttribute('aria-label'))"
    )
    close(picker)
    return choices


def pick(page: Page, name: str) -> None:
    picker = panel(page, "picks")
    picker.locator("input").click()
    picker.locator(f'[data-testid="dropdown-option"][aria-label="{name}"]').click()
    close(picker)


def close(picker: Locator) -> None:
    """Close the list and leave the picker, so that the next click opens it again (it opens on focus)."""
    picker.locator("input").press("Escape")
    picker.locator("input").evaluate("e => e.blur()")


def picked(page: Page, tab: str = "txt2img") -> list[str]:
    """The picker's tokens (the LoRAs picked)."""
    return [t.strip() for t in panel(page, "picks", tab).locator(".token").all_inner_texts()]


def picture(page: Page, tab: str = "txt2img") -> dict[tuple[str, int, str], tuple[str, str | None]]:
    """The schedule picture's LoRA cells: (pass, step, LoRA) -> (state, weight)."""
    cells = (
        panel(page, "schedule", tab)
        .locator("rect[data-lora]")
        .evaluate_all(
            "els => els.map(e => [e.dataset.pass, e.dataset.step, e.dataset.lora, e.dataset.state, e.dataset.weight])"
        )
    )
    return {(p, int(s), lora): (state, weight) for p, s, lora, state, weight in cells}


def unet_passes(page: Page) -> list[tuple[str, int, int]]:
    cells = (
        panel(page, "schedule")
        .locator("rect[data-passes]")
        .evaluate_all("els => els.map(e => [e.dataset.pass, e.dataset.step, e.dataset.passes])")
    )
    return [(p, int(s), int(n)) for p, s, n in cells]


def preview(page: Page, tab: str = "txt2img") -> str:
    return panel(page, "preview", tab).last.inner_text()  # gradio 3 gives its wrapper and its text the same id
