"""Fixtures for the real-Forge tier: one API-only Forge per session with a tiny random SD1.5 model and test LoRAs
(and, on first use, a second one without the extension).

The host is ``$MULTILORA_FORGE_HOST`` (``forge`` by default, or ``reforge``: server.py). Everything here is skipped
unless the host's variable (``SD_FORGE_DIR``, ``SD_REFORGE_DIR``) names its checkout; see README.md. Tests of a
feature only Forge has (marked ``forge2_only``) are deselected on reForge, each named with its reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hosts.tier import Tier

from .server import HOST, HOST_LABEL, SKIP_REASON, ForgeServer, build_assets, forge_dir_from_env, tracebacks

if TYPE_CHECKING:
    from webui.server import WebuiClient

HERE = Path(__file__).resolve().parent
TIER = Tier(HERE, forge_dir_from_env, SKIP_REASON, HOST_LABEL, tracebacks)
#: The tests deselected on this host, with their reasons (printed in the terminal summary).
DESELECTED: pytest.StashKey[list[tuple[str, str]]] = pytest.StashKey()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "forge2_only(reason): checks a feature of Forge (lllyasviel's, its backend) that reForge does not have: "
        "deselected when MULTILORA_FORGE_HOST=reforge",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the tier without its host's variable; on reForge, deselect the ``forge2_only`` tests (a deselected
    test is not a skipped one: MULTILORA_FAIL_ON_SKIP holds the rest of the tier to running)."""
    TIER.skip_unconfigured(items)
    if HOST == "forge":
        return
    kept, dropped, reasons = [], [], []
    for item in items:
        mark = item.get_closest_marker("forge2_only") if TIER.contains(item) else None
        if mark is None:
            kept.append(item)
        else:
            dropped.append(item)
            reasons.append((item.nodeid, mark.args[0] if mark.args else mark.kwargs.get("reason", "Forge only")))
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
    config.stash[DESELECTED] = reasons


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    reasons = config.stash.get(DESELECTED, [])
    if reasons:
        terminalreporter.section(f"deselected on {HOST_LABEL}: {len(reasons)} test(s) of a Forge-only feature")
        for nodeid, reason in reasons:
            terminalreporter.write_line(f"{nodeid}: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    TIER.attach_log(item, outcome.get_result())  # type: ignore[attr-defined]


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
    return TIER.require()


@pytest.fixture(scope="session")
def forge_assets(forge_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ForgeAssets:
    """The tiny SD1.5 checkpoint and the LoRAs mlA, mlB, mlC (plain) and mlLoha (LoHa), seed 0."""
    manifest = build_assets(forge_dir, tmp_path_factory.mktemp("forge-models"))
    return ForgeAssets(Path(manifest["ckpt"]), Path(manifest["lora_dir"]), manifest["loras"])


@pytest.fixture(scope="session")
def flux_assets(forge_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny Flux checkpoints (dev, schnell, the dev transformer as GGUF), their VAE and text encoders as files of
    their own and the Flux LoRAs (``tiny_dit.py``'s manifest), built once, on first use."""
    return build_assets(forge_dir, tmp_path_factory.mktemp("forge-flux"), script="tiny_dit.py")


@pytest.fixture(scope="session")
def forge_server(
    forge_dir: Path, forge_assets: ForgeAssets, tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[ForgeServer]:
    """The running Forge with the extension and the probe (started once per session, stopped by its own PID)."""
    pytest.importorskip("requests")
    server = ForgeServer(forge_dir, tmp_path_factory.mktemp("forge-data"), forge_assets.ckpt, forge_assets.lora_dir)
    with TIER.serving(server, pytestconfig):
        yield server


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
    server = ForgeServer(forge_dir, data_dir, forge_assets.ckpt, forge_assets.lora_dir, with_extension=False)
    with TIER.serving(server):
        client = WebuiClient(server)
        yield client
        client.close()


@pytest.fixture
def no_tracebacks(forge: WebuiClient) -> Iterator[None]:
    """Fail the test if Forge logged a Traceback while it ran (the API often hides errors in the log)."""
    with TIER.no_tracebacks(forge):
        yield
