"""Fixtures for the real-Forge tier: one API-only Forge per session with a tiny random SD1.5 model and test LoRAs
(and, on first use, a second one without the extension).

Everything here is skipped unless ``SD_FORGE_DIR`` names a Forge checkout; see README.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .server import SKIP_REASON, ForgeServer, build_assets, forge_dir_from_env, tracebacks

if TYPE_CHECKING:
    from webui.server import WebuiClient

HERE = Path(__file__).resolve().parent
_SERVER: pytest.StashKey[ForgeServer] = pytest.StashKey()


def _in_tier(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without SD_FORGE_DIR, skip every test of this tier with one clear reason."""
    if forge_dir_from_env() is not None:
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if _in_tier(item):
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the tail of Forge's log to failing tests of this tier: the cause is usually only in there."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed and _in_tier(item):
        server = item.config.stash.get(_SERVER, None)
        if server is not None:
            report.sections.append(("Forge server log (tail)", server.log_tail()))


@dataclass(frozen=True)
class ForgeAssets:
    """Files built for the session (``tiny_model.py``): the checkpoint, the LoRA dir and, per LoRA name, its
    manifest entry (``path``, ``kind``, ``n_unet``, ``n_te``: the UNet and text-encoder weights it patches)."""

    ckpt: Path
    lora_dir: Path
    loras: dict[str, dict[str, Any]]


@pytest.fixture(scope="session")
def forge_dir() -> Path:
    """The Forge checkout under test (``$SD_FORGE_DIR``)."""
    path = forge_dir_from_env()
    if path is None:
        pytest.skip(SKIP_REASON)
    return path


@pytest.fixture(scope="session")
def forge_assets(forge_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ForgeAssets:
    """The tiny SD1.5 checkpoint and the LoRAs mlA, mlB, mlC (plain) and mlLoha (LoHa), seed 0."""
    manifest = build_assets(forge_dir, tmp_path_factory.mktemp("forge-models"))
    return ForgeAssets(Path(manifest["ckpt"]), Path(manifest["lora_dir"]), manifest["loras"])


def _started(server: ForgeServer) -> ForgeServer:
    """``server`` running and ready, or stopped again if it could not get there."""
    server.start()
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def forge_server(
    forge_dir: Path, forge_assets: ForgeAssets, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[ForgeServer]:
    """The running Forge with the extension and the probe (started once per session, stopped by its own PID)."""
    pytest.importorskip("requests")
    server = ForgeServer(forge_dir, tmp_path_factory.mktemp("forge-data"), forge_assets.ckpt, forge_assets.lora_dir)
    pytestconfig.stash[_SERVER] = server
    _started(server)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def forge(forge_server: ForgeServer) -> Iterator[WebuiClient]:
    """HTTP client (the A1111 tier's ``WebuiClient``): txt2img/img2img (-> Result), get/post (-> JSON), log_text()."""
    from webui.server import WebuiClient

    client = WebuiClient(forge_server)
    yield client
    client.close()


@pytest.fixture(scope="session")
def forge_without_extension(
    forge_dir: Path, forge_assets: ForgeAssets, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WebuiClient]:
    """A second Forge on the same checkpoint and LoRAs with only the probe: the "extension absent" reference.
    Started on first use only (two Forges booting at once on two cores take longer than one after the other)."""
    from webui.server import WebuiClient

    data_dir = tmp_path_factory.mktemp("forge-data-plain")
    server = _started(ForgeServer(forge_dir, data_dir, forge_assets.ckpt, forge_assets.lora_dir, with_extension=False))
    try:
        client = WebuiClient(server)
        yield client
        client.close()
    finally:
        server.stop()


@pytest.fixture
def no_tracebacks(forge: WebuiClient) -> Iterator[None]:
    """Fail the test if Forge logged a Traceback while it ran (the API often hides errors in the log)."""
    mark = forge.log_mark()
    yield
    found = tracebacks(forge.log_text(mark))
    if found:
        pytest.fail("Forge logged a Traceback during the test:\n" + "\n".join(found)[:6000])
