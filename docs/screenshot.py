"""Screenshot of the Multi-LoRA Composition panel in a real webui's txt2img tab (headless Chromium over CDP).

Starts the webui with its gradio UI as ``python -m tests.hosts run a1111`` does (``tests/hosts/ui.py``: a throwaway
folder, the tiny random SD1 model and test LoRAs of the real-webui test tier), types a prompt with three ``<lora>``
tags, opens the panel, picks Composite, checks that the panel then shows Composite's controls only, and saves a PNG.

    SD_WEBUI_DIR=/path/to/webui /path/to/webui/venv/bin/python docs/screenshot.py [--out docs/panel.png]

Needs a Chromium binary (Debian: ``apt-get install chromium``, plus ``fonts-noto-color-emoji`` for the webui's icon
buttons) and the ``websockets`` package (>= 11, a gradio dependency, so the webui's venv has it).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.hosts.ui import ui_server  # noqa: E402
from tests.webui.server import stop_process, webui_dir_from_env, webui_python  # noqa: E402

PROMPT = "a portrait <lora:mlA:0.8> <lora:mlB:0.8> <lora:mlC:0.8>"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
)

#: Runs in the page once onUiLoaded has set up the accordions: fill the prompt, open the panel, pick Composite.
SETUP_JS = """
(() => {
    const app = gradioApp();
    const prompt = app.querySelector('#txt2img_prompt textarea');
    prompt.value = %s;
    updateInput(prompt);
    const accordion = app.querySelector('#txt2img_multilora');
    if (!accordion.querySelector('.label-wrap').classList.contains('open')) {
        accordion.querySelector('.label-wrap').click();
    }
    const composite = app.querySelector('#txt2img_multilora_method input[value="Composite"]');
    composite.click();
    return true;
})()
"""

#: The panel shows the chosen method's controls only: with Composite, the execution and no τ (a hidden component has no
#: offsetParent). A panel that does not get there fails the script.
COMPOSITE_CONTROLS_JS = (
    "gradioApp().querySelector('#txt2img_multilora_tau').offsetParent === null && "
    "gradioApp().querySelector('#txt2img_multilora_execution').offsetParent !== null"
)

#: True once the server has answered the prompt's token count ("N/75" with N > 0; the inner .prose holds the answer).
TOKENS_COUNTED_JS = (
    r"/^\s*[1-9]\d*\/\d+\s*$/.test(gradioApp().querySelector('#txt2img_token_counter .prose').textContent)"
)

#: The region to capture: the tab from its top (prompt row) down to the bottom of the panel, full tab width.
CLIP_JS = """
(() => {
    const app = gradioApp();
    window.scrollTo(0, 0);
    const tab = app.querySelector('#tab_txt2img').getBoundingClientRect();
    const top = app.querySelector('#txt2img_toprow').getBoundingClientRect();
    const panel = app.querySelector('#txt2img_multilora').getBoundingClientRect();
    return JSON.stringify({x: tab.left, y: Math.max(0, top.top - 16), right: tab.right, bottom: panel.bottom + 8});
})()
"""


class Cdp:
    """Minimal synchronous Chrome DevTools Protocol client on one page target."""

    def __init__(self, ws_url: str) -> None:
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, open_timeout=30)
        self.ids = itertools.count(1)

    def call(self, method: str, timeout: float = 60.0, **params: Any) -> dict[str, Any]:
        """Send one command and return its result, skipping the events that arrive meanwhile."""
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if msg.get("id") != msg_id:
                continue
            if "error" in msg:
                raise RuntimeError(f"{method}: {msg['error']}")
            return msg["result"]

    def evaluate(self, expression: str) -> Any:
        """Runtime.evaluate returning the value; page exceptions are raised."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 120.0) -> None:
        """Poll a boolean expression until it is true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.evaluate(expression):
                    return
            except RuntimeError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {expression}")

    def close(self) -> None:
        self.ws.close()


def find_chromium(explicit: str | None) -> str:
    """The Chromium binary: --chromium, ``$CHROMIUM``, or the first of the usual names on PATH."""
    for name in (explicit, os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (path := shutil.which(name)):
            return path
    raise SystemExit("no Chromium found: install it (apt-get install chromium) or pass --chromium")


def start_chromium(binary: str, profile: Path, width: int, height: int) -> tuple[subprocess.Popen[bytes], str]:
    """Start headless Chromium; return the process and the websocket URL of its page target."""
    proc = subprocess.Popen(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=open(profile.parent / "chromium.log", "wb"),  # noqa: SIM115 - lives as long as the process
    )
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not port_file.exists() or not port_file.read_text().strip():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"Chromium did not start; see {profile.parent / 'chromium.log'}")
        time.sleep(0.2)
    port = port_file.read_text().split()[0]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
        targets = json.load(resp)
    page = next(t for t in targets if t.get("type") == "page")
    return proc, page["webSocketDebuggerUrl"]


def capture(cdp: Cdp, url: str, width: int, height: int) -> bytes:
    """Load the UI, set the panel up and return a PNG of the prompt row down to the panel."""
    cdp.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
    cdp.call("Page.enable")
    cdp.call("Page.navigate", url=url)
    # the onUiLoaded callbacks have run (the accordion's visible checkbox, the token counter's input listener) and so
    # have the onOptionsChanged ones (they show the token counter; a hidden one ignores edits)
    cdp.wait_for(
        "!!(window.gradioApp && gradioApp().querySelector('#txt2img_multilora-visible-checkbox')"
        " && typeof promptTokenCountUpdateFunctions === 'object'"
        " && promptTokenCountUpdateFunctions.txt2img_prompt"
        " && gradioApp().querySelector('#txt2img_token_counter').classList.contains('token-counter-visible'))"
    )
    cdp.evaluate(SETUP_JS % json.dumps(PROMPT))
    cdp.wait_for(
        "gradioApp().querySelector('#txt2img_multilora .label-wrap').classList.contains('open') && "
        "gradioApp().querySelector('#txt2img_multilora_method input[value=\"Composite\"]').checked"
    )
    cdp.wait_for(COMPOSITE_CONTROLS_JS, 30)
    cdp.evaluate("document.activeElement && document.activeElement.blur(), true")
    with contextlib.suppress(RuntimeError):  # cosmetic: the token counter asks the server after an 800 ms debounce
        cdp.wait_for(TOKENS_COUNTED_JS, 30)
    time.sleep(1.5)  # let the accordion's open transition and the fonts settle
    box = json.loads(cdp.evaluate(CLIP_JS))
    clip = {"x": box["x"], "y": box["y"], "width": box["right"] - box["x"], "height": box["bottom"] - box["y"]}
    shot = cdp.call("Page.captureScreenshot", format="png", clip={**clip, "scale": 1}, captureBeyondViewport=True)
    return base64.b64decode(shot["data"])


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
    parser.add_argument("--out", type=Path, default=HERE / "panel.png", help="PNG to write (default docs/panel.png)")
    parser.add_argument("--width", type=int, default=1200, help="browser viewport width in CSS px")
    parser.add_argument("--height", type=int, default=1400, help="browser viewport height in CSS px")
    parser.add_argument("--chromium", help="Chromium binary (default: $CHROMIUM or chromium on PATH)")
    parser.add_argument("--max-kb", type=int, default=300, help="quantize the PNG when it is larger than this")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dir (logs) for inspection")
    args = parser.parse_args(argv)

    webui_dir = webui_dir_from_env()
    if webui_dir is None:
        raise SystemExit("set SD_WEBUI_DIR to a webui 1.10.x checkout")
    chromium = find_chromium(args.chromium)

    work = Path(tempfile.mkdtemp(prefix="multilora-shot-"))
    server = ui_server("a1111", webui_dir, webui_python(), work)
    browser: subprocess.Popen[bytes] | None = None
    try:
        print(f"starting webui on {server.base_url} (log: {server.log_path})", flush=True)
        server.start()
        server.wait_ready()
        profile = work / "chromium-profile"
        profile.mkdir()
        browser, ws_url = start_chromium(chromium, profile, args.width, args.height)
        cdp = Cdp(ws_url)
        try:
            png = capture(cdp, server.base_url + "/", args.width, args.height)
        finally:
            cdp.close()
        save_png(png, args.out, args.max_kb * 1024)
        print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")
    finally:
        if browser is not None:
            stop_process(browser, 10.0)
        server.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
