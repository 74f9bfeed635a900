"""Multi-LoRA beside ADetailer in a real Forge (or reForge): the checks are every host's (tests/hosts/adetailer.py);
this module gives them a server of its own with ADetailer (unpacked among the host's neighbours) on the session's model
and LoRAs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hosts.adetailer import *  # noqa: F403 - the checks, collected here
from hosts.adetailer import AD_FLAGS, ADETAILER, copy_loras
from webui.server import WebuiClient

from .conftest import TIER
from .server import HOST_LABEL, REFORGE, SKIP_REASON, ForgeServer, forge_dir_from_env, neighbours_dir_from_env

if TYPE_CHECKING:
    from .conftest import ForgeAssets

if forge_dir_from_env() is None:
    pytest.skip(SKIP_REASON, allow_module_level=True)
NEIGHBOURS = neighbours_dir_from_env()
if NEIGHBOURS is None:
    pytest.skip(
        f"no {HOST_LABEL} neighbours (tests.hosts setup): the ADetailer tests are skipped", allow_module_level=True
    )
pytest.importorskip("numpy")


@pytest.fixture(scope="module")
def ad_neighbours() -> Path:
    return NEIGHBOURS


@pytest.fixture(scope="module")
def ad_reforge() -> bool:
    return REFORGE


@pytest.fixture(scope="module")
def ad(forge_dir: Path, forge_assets: ForgeAssets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Forge with our extension, the probes and ADetailer (no hub downloads), on the session's model and LoRAs."""
    copy_loras(forge_assets.lora_dir)
    data_dir = tmp_path_factory.mktemp("forge-data-adetailer")
    server = ForgeServer(forge_dir, data_dir, forge_assets.ckpt, forge_assets.lora_dir, extra_flags=AD_FLAGS)
    with TIER.beside(server, NEIGHBOURS, (ADETAILER,)) as client:
        yield client


@pytest.fixture(autouse=True)
def clean_log(ad: WebuiClient) -> Iterator[None]:
    """Fail a test whose server logged a traceback while it ran."""
    with TIER.no_tracebacks(ad):
        yield
