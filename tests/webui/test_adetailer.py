"""Multi-LoRA beside ADetailer in the real webui: the checks are every host's (tests/hosts/adetailer.py); this module
gives them a webui of its own with ADetailer (unpacked in ``$SD_WEBUI_NEIGHBOURS``) on the session's model and
LoRAs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hosts.adetailer import *  # noqa: F403 - the checks, collected here
from hosts.adetailer import AD_FLAGS, ADETAILER, copy_loras, neighbours_dir

from .conftest import TIER
from .helpers import require_tier
from .server import WebuiClient, WebuiServer

if TYPE_CHECKING:
    from .conftest import WebuiAssets

require_tier()
NEIGHBOURS = neighbours_dir("SD_WEBUI_NEIGHBOURS")
if NEIGHBOURS is None:
    pytest.skip("SD_WEBUI_NEIGHBOURS is not set: the ADetailer tests are skipped", allow_module_level=True)


@pytest.fixture(scope="module")
def ad_neighbours() -> Path:
    return NEIGHBOURS


@pytest.fixture(scope="module")
def ad_reforge() -> bool:
    return False


@pytest.fixture(scope="module")
def ad(webui_dir: Path, webui_assets: WebuiAssets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A webui with our extension, the probes and ADetailer (no hub downloads), on the session's model and LoRAs."""
    copy_loras(webui_assets.lora_dir)
    server = WebuiServer(
        webui_dir=webui_dir,
        data_dir=tmp_path_factory.mktemp("webui-data-adetailer"),
        ckpt=webui_assets.ckpt,
        lora_dir=webui_assets.lora_dir,
        extra_flags=AD_FLAGS,
    )
    with TIER.beside(server, NEIGHBOURS, (ADETAILER,)) as client:
        yield client


@pytest.fixture(autouse=True)
def clean_log(ad: WebuiClient) -> Iterator[None]:
    """Fail a test whose server logged a traceback while it ran."""
    with TIER.no_tracebacks(ad):
        yield
