"""Fixtures for the real-webui tier: one API-only webui per session, with a tiny random SD1 model and test LoRAs.

Everything here is skipped unless ``SD_WEBUI_DIR`` names a webui 1.10.x checkout; see README.md.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hosts.tier import Tier

from .server import SKIP_REASON, WebuiClient, WebuiServer, tracebacks, webui_dir_from_env

if TYPE_CHECKING:
    from .tiny_lora import LoraInfo

HERE = Path(__file__).resolve().parent
TIER = Tier(HERE, webui_dir_from_env, SKIP_REASON, "webui", tracebacks)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    TIER.skip_unconfigured(items)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    TIER.attach_log(item, outcome.get_result())  # type: ignore[attr-defined]


@dataclass(frozen=True)
class WebuiAssets:
    """Files generated for the session: the tiny checkpoint (with .yaml and tiny-clip/) and the LoRA dir."""

    data_dir: Path
    ckpt: Path
    lora_dir: Path
    loras: dict[str, LoraInfo]


@pytest.fixture(scope="session")
def webui_dir() -> Path:
    """The webui checkout under test (``$SD_WEBUI_DIR``)."""
    return TIER.require()


@pytest.fixture(scope="session")
def webui_assets(webui_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> WebuiAssets:
    """Build the tiny model and LoRAs inside a fresh webui data dir (models/Stable-diffusion, models/Lora)."""
    from .tiny_lora import build_loras
    from .tiny_model import build_tiny_sd1

    data_dir = tmp_path_factory.mktemp("webui-data")
    ckpt = build_tiny_sd1(data_dir / "models" / "Stable-diffusion", seed=0, webui_dir=webui_dir)
    lora_dir = data_dir / "models" / "Lora"
    loras = build_loras(lora_dir, ckpt, seed=0, webui_dir=webui_dir)
    return WebuiAssets(data_dir=data_dir, ckpt=ckpt, lora_dir=lora_dir, loras=loras)


@pytest.fixture(scope="session")
def lora_infos(webui_assets: WebuiAssets) -> dict[str, LoraInfo]:
    """name -> LoraInfo (path, kind, expected UNet/TE module counts) for mlA, mlB, mlC, mlLocon, mlLoha."""
    return webui_assets.loras


@pytest.fixture(scope="session")
def webui_server(webui_dir: Path, webui_assets: WebuiAssets, pytestconfig: pytest.Config) -> Iterator[WebuiServer]:
    """The running webui (started once per session, stopped by its own PID at the end)."""
    pytest.importorskip("requests")
    server = WebuiServer(
        webui_dir=webui_dir, data_dir=webui_assets.data_dir, ckpt=webui_assets.ckpt, lora_dir=webui_assets.lora_dir
    )
    with TIER.serving(server, pytestconfig):
        yield server


@pytest.fixture(scope="session")
def webui_without_extension(
    webui_dir: Path, webui_assets: WebuiAssets, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WebuiClient]:
    """A second webui on the same checkpoint and LoRAs with only the probe installed: the "extension absent"
    reference. Started on first use only."""
    server = WebuiServer(
        webui_dir=webui_dir,
        data_dir=tmp_path_factory.mktemp("webui-data-plain"),
        ckpt=webui_assets.ckpt,
        lora_dir=webui_assets.lora_dir,
        with_extension=False,
    )
    with TIER.serving(server):
        client = WebuiClient(server)
        yield client
        client.close()


@pytest.fixture(scope="session")
def webui(webui_server: WebuiServer) -> Iterator[WebuiClient]:
    """HTTP client: txt2img/img2img (-> Result), get/post (-> JSON), probe helpers, log_text(), base_url."""
    client = WebuiClient(webui_server)
    yield client
    client.close()


@pytest.fixture
def alt_checkpoint(webui: WebuiClient, webui_assets: WebuiAssets, webui_dir: Path) -> Iterator[tuple[str, str]]:
    """A second tiny checkpoint (other seed) beside the session's; yields (original title, alt title) and switches
    back to the original at the end, so later tests see the session's model."""
    from .tiny_model import build_tiny_sd1

    folder = webui_assets.ckpt.parent / "alt"
    alt = build_tiny_sd1(folder, seed=1, webui_dir=webui_dir)
    webui.post("/sdapi/v1/refresh-checkpoints")
    titles = {Path(m["filename"]).resolve(): m["title"] for m in webui.get("/sdapi/v1/sd-models")}
    original = titles[webui_assets.ckpt.resolve()]
    try:
        yield original, titles[alt.resolve()]
    finally:
        webui.post("/sdapi/v1/options", {"sd_model_checkpoint": original})
        shutil.rmtree(folder)
        webui.post("/sdapi/v1/refresh-checkpoints")


@pytest.fixture
def no_tracebacks(webui: WebuiClient) -> Iterator[None]:
    """Fail the test if the webui logged a Traceback while it ran (the API often hides errors in the log)."""
    with TIER.no_tracebacks(webui):
        yield
