"""Fixtures for the browser tier: per host (A1111, Forge, reForge) one server with its full UI per session, started as
``python -m tests.hosts run`` starts it (``tests/hosts/ui.py``), and fresh Chromium pages on it (Playwright).

The whole tier is skipped without Playwright's package or Debian's Chromium, and a host's half without that host's
variable (``SD_WEBUI_DIR``, ``SD_FORGE_DIR``, ``SD_REFORGE_DIR``); see README.md.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from forge.server import HOSTS as FORGE_HOSTS
from forge.server import forge_dir_from_env, forge_python
from forge.server import tracebacks as forge_tracebacks
from hosts.recipes import RECIPES
from hosts.tier import Tier
from hosts.ui import ui_server
from webui.server import EXTENSION_LINK_NAME, WebuiClient, WebuiServer, webui_dir_from_env, webui_python
from webui.server import tracebacks as webui_tracebacks

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

HERE = Path(__file__).resolve().parent
#: Debian's Chromium (``apt-get install chromium``): Playwright's own browser download is not used.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
#: Playwright's wait for a page element; a generation has its own, longer one (tests/browser/test_panel.py).
TIMEOUT_MS = 60_000

#: Per host: its checkout's variable (and the tier's log checks), as in its own tier.
TIERS = {
    "a1111": Tier(
        HERE, webui_dir_from_env, "SD_WEBUI_DIR is not set: A1111 browser tests skipped", "webui", webui_tracebacks
    ),
    **{
        host: Tier(
            HERE,
            partial(forge_dir_from_env, host),
            f"{RECIPES[host].dir_var} is not set: {label} browser tests skipped",
            label,
            forge_tracebacks,
        )
        for host, label in FORGE_HOSTS.items()
    },
}
PYTHONS: dict[str, Callable[[], str]] = {"a1111": webui_python, **{h: partial(forge_python, h) for h in FORGE_HOSTS}}


def browser_missing() -> str | None:
    """Why the tier cannot run here, or None."""
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright): browser tier skipped"
    if not CHROMIUM.is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium fonts-noto-color-emoji): browser tier skipped"
    return None


def _in_tier(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without Playwright or Chromium, skip the tier with one clear reason, before any server is started."""
    reason = browser_missing()
    if reason is None:
        return
    for item in items:
        if _in_tier(item):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failing test gets the tail of its host's server log."""
    outcome = yield
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.params.get("ui") in TIERS:
        TIERS[callspec.params["ui"]].attach_log(item, outcome.get_result())  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Ui:
    """A running host with its UI: which host (``a1111``, ``forge``, ``reforge``), its server and the tier's log
    checks."""

    name: str
    server: WebuiServer
    tier: Tier


@pytest.fixture(scope="session", params=sorted(TIERS))
def ui(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ui]:
    """The host's full UI with the extension, the tier's tiny model and LoRAs (mlA, mlB, ...): one per host and
    session, the other host's stopped first (pytest runs one param's tests, then the next's)."""
    name: str = request.param
    tier = TIERS[name]
    server = ui_server(name, tier.require(), PYTHONS[name](), tmp_path_factory.mktemp(f"{name}-ui"))
    with tier.serving(server, request.config):
        yield Ui(name, server, tier)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """Headless Debian Chromium, one for the session."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=list(CHROMIUM_ARGS))
        yield browser
        browser.close()


@pytest.fixture
def open_page(ui: Ui, browser: Browser) -> Iterator[Callable[[], Page]]:
    """``open_page()``: a fresh page (its own browser context) with the UI loaded, the panel's accordion set up.
    The test fails when the extension's script raised in a page or the server logged a traceback meanwhile (the
    hosts' own page errors are left alone: A1111's gradio 3 throws one on every width or height change)."""
    contexts: list[BrowserContext] = []
    errors: list[str] = []

    def open_() -> Page:
        context = browser.new_context(viewport={"width": 1280, "height": 1600})
        contexts.append(context)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(f"{error.message}\n{error.stack}"))
        page.goto(ui.server.base_url + "/")
        # created by the webui's onUiLoaded callbacks: the page is built and its scripts have run
        page.locator("#txt2img_multilora-visible-checkbox").wait_for(state="attached")
        return page

    client = WebuiClient(ui.server)
    with ui.tier.no_tracebacks(client):
        yield open_
        for context in contexts:
            context.close()
    client.close()
    ours = [error for error in errors if f"/{EXTENSION_LINK_NAME}/" in error]
    assert not ours, f"the extension's script failed in the {ui.name} page: {ours}"
