"""Screenshots of the Multi-LoRA Composition panel in a real webui's txt2img tab (headless Chromium, Playwright).

Starts the webui with its gradio UI as ``python -m tests.hosts run a1111`` does (``tests/hosts/ui.py``: a throwaway
folder, the tiny random SD1 model and test LoRAs of the real-webui test tier), in the light theme, and drives the
panel as the browser tier does (``tests/browser/driver.py``):

- ``docs/panel.png``: a prompt with three ``<lora>`` tags, Composite with weights 2,1,1 in the first half of the
  steps; the tab from its prompt row down to the bottom of the panel.
- ``docs/schedule.png``: the example of issue 25, Switch at 30 steps, τ = 4, a window of 0.2-0.8, with a hires pass
  of 16 steps; the panel's preview and schedule picture, at twice the pixel density.

    SD_WEBUI_DIR=/path/to/webui /path/to/webui/venv/bin/python docs/screenshot.py [--out-dir docs]

Needs Playwright's Python package (the host venvs of ``python -m tests.hosts setup`` have it) and Debian's Chromium
(``apt-get install chromium fonts-noto-color-emoji``; the emoji font draws the webui's icon buttons).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(REPO_ROOT))

from playwright.sync_api import Error as PlaywrightError  # noqa: E402
from playwright.sync_api import sync_playwright  # noqa: E402

from tests.browser.driver import (  # noqa: E402
    enable_hires,
    open_panel,
    panel,
    picture,
    set_control,
    set_steps,
    settle,
)
from tests.hosts.ui import ui_server  # noqa: E402
from tests.webui.server import webui_dir_from_env, webui_python  # noqa: E402

PROMPT = "a portrait <lora:mlA:0.8> <lora:mlB:0.8> <lora:mlC:0.8>"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ("--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--hide-scrollbars")

#: True once the server has answered the prompt's token count ("N/75" with N > 0; the inner .prose holds the answer).
TOKENS_COUNTED_JS = (
    r"() => /^\s*[1-9]\d*\/\d+\s*$/.test(gradioApp().querySelector('#txt2img_token_counter .prose').textContent)"
)
#: The region of the panel shot: the tab from its top (prompt row) down to the bottom of the panel, full tab width.
PANEL_CLIP_JS = """
() => {
    const app = gradioApp();
    window.scrollTo(0, 0);
    const tab = app.querySelector('#tab_txt2img').getBoundingClientRect();
    const top = app.querySelector('#txt2img_toprow').getBoundingClientRect();
    const panel = app.querySelector('#txt2img_multilora').getBoundingClientRect();
    return {x: tab.left, y: Math.max(0, top.top - 16), right: tab.right, bottom: panel.bottom + 8};
}
"""
#: The region of the schedule shot: the preview line and the picture, the panel's width.
SCHEDULE_CLIP_JS = """
() => {
    const app = gradioApp();
    const panel = app.querySelector('#txt2img_multilora').getBoundingClientRect();
    const line = app.querySelector('#txt2img_multilora_preview').getBoundingClientRect();
    const picture = app.querySelector('#txt2img_multilora_schedule').getBoundingClientRect();
    return {x: panel.left, y: line.top, right: panel.right, bottom: picture.bottom + 8};
}
"""


def shoot(page: Any, clip_js: str, out: Path, max_bytes: int) -> None:
    """Save the region ``clip_js`` returns (page coordinates) as a PNG."""
    box = page.evaluate(clip_js)
    scroll = page.evaluate("() => ({x: window.scrollX, y: window.scrollY})")
    clip = {
        "x": box["x"] + scroll["x"],
        "y": box["y"] + scroll["y"],
        "width": box["right"] - box["x"],
        "height": box["bottom"] - box["y"],
    }
    save_png(page.screenshot(clip=clip, full_page=True, animations="disabled"), out, max_bytes)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB)")


def panel_shot(page: Any, out: Path, max_bytes: int) -> None:
    """Composite over the prompt's three LoRAs, weights 2,1,1, in the first half of the steps."""
    page.locator("#txt2img_prompt textarea").fill(PROMPT)
    open_panel(page)
    panel(page, "method").get_by_label("Composite", exact=True).check()
    set_control(page, "weights", "2,1,1")
    set_control(page, "end", "0.5")
    settle(lambda: picture(page).get(("first", 9, "mlA"), ("",))[0], "run", "the picture of Composite in 0-0.5")
    settle(lambda: picture(page).get(("first", 10, "mlA"), ("",))[0], "merged", "steps after the window merged")
    page.locator("#txt2img_prompt textarea").blur()
    with contextlib.suppress(PlaywrightError):  # cosmetic: the token counter asks the server after a debounce
        page.wait_for_function(TOKENS_COUNTED_JS, timeout=30_000)
    page.wait_for_timeout(1500)  # the accordion's transition
    shoot(page, PANEL_CLIP_JS, out, max_bytes)


def schedule_shot(page: Any, out: Path, max_bytes: int) -> None:
    """Issue 25's example: Switch, 30 steps, τ 4, window 0.2-0.8, and a hires pass of 16 steps (Restart)."""
    page.locator("#txt2img_prompt textarea").fill(PROMPT)
    open_panel(page)
    set_steps(page, 30)
    set_control(page, "tau", "4")
    set_control(page, "start", "0.2")
    set_control(page, "end", "0.8")
    enable_hires(page, 16)
    settle(lambda: ("hires", 15, "mlC") in picture(page), True, "the hires pass in the picture")
    settle(lambda: picture(page)[("first", 6, "mlA")][0], "run", "Switch from the window's first step")
    page.locator("#txt2img_multilora_schedule").last.scroll_into_view_if_needed()
    page.wait_for_timeout(1000)
    shoot(page, SCHEDULE_CLIP_JS, out, max_bytes)


def save_png(data: bytes, out: Path, max_bytes: int) -> None:
    """Write the PNG, palette-quantized when the plain one exceeds max_bytes (UI flats quantize cleanly)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if len(data) > max_bytes:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            buf = io.BytesIO()
            small.save(buf, format="PNG", optimize=True)
            data = buf.getvalue()
    out.write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=HERE, help="where panel.png and schedule.png go (docs/)")
    parser.add_argument("--width", type=int, default=1200, help="browser viewport width in CSS px")
    parser.add_argument("--height", type=int, default=1600, help="browser viewport height in CSS px")
    parser.add_argument("--theme", choices=("light", "dark"), default="light", help="the webui's theme")
    parser.add_argument("--max-kb", type=int, default=300, help="quantize a PNG when it is larger than this")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dir (logs) for inspection")
    args = parser.parse_args(argv)

    webui_dir = webui_dir_from_env()
    if webui_dir is None:
        raise SystemExit("set SD_WEBUI_DIR to a webui 1.10.x checkout")

    work = Path(tempfile.mkdtemp(prefix="multilora-shot-"))
    server = ui_server("a1111", webui_dir, webui_python(), work)
    try:
        print(f"starting webui on {server.base_url} (log: {server.log_path})", flush=True)
        server.start()
        server.wait_ready()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=list(CHROMIUM_ARGS))
            for shot, name, scale in ((panel_shot, "panel.png", 1), (schedule_shot, "schedule.png", 2)):
                viewport = {"width": args.width, "height": args.height}
                page = browser.new_page(viewport=viewport, device_scale_factor=scale)
                page.set_default_timeout(120_000)
                page.goto(f"{server.base_url}/?__theme={args.theme}")
                page.locator("#txt2img_multilora-visible-checkbox").wait_for(state="attached")
                shot(page, args.out_dir / name, args.max_kb * 1024)
                page.close()
            browser.close()
    finally:
        server.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
