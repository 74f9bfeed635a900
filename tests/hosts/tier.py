"""What every real-host tier's conftest does the same way: skip the tier without its variable, attach the server's
log to failing tests, start one server per session, fail a test whose server logged a traceback, and the no-trace
snapshot. Each tier's conftest keeps only what differs (its server class, model builder and fixtures' names).

Only the standard library and pytest at module level, so collecting a tier never needs the host's packages.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pytest

if TYPE_CHECKING:
    import numpy as np


class Server(Protocol):
    """What a tier's server class offers (tests/webui/server.py's ``WebuiServer`` and its subclasses)."""

    data_dir: Path

    def prepare_data_dir(self) -> None: ...
    def start(self) -> None: ...
    def wait_ready(self) -> None: ...
    def stop(self) -> None: ...
    def log_tail(self) -> str: ...


class Client(Protocol):
    server: Any

    def get(self, path: str) -> Any: ...
    def post(self, path: str, json: Any = None) -> Any: ...
    def log_mark(self) -> int: ...
    def log_text(self, since: int = 0) -> str: ...


@dataclass
class Tier:
    """One host tier: its folder, the variable that configures it (``configured()`` gives None without it), the
    one-line skip reason and the host's name for messages."""

    folder: Path
    configured: Callable[[], Path | None]
    skip_reason: str
    host: str
    tracebacks: Callable[[str], list[str]]
    _server: pytest.StashKey[Server] = field(default_factory=pytest.StashKey)

    def contains(self, item: pytest.Item) -> bool:
        return self.folder in Path(str(item.path)).resolve().parents

    def skip_unconfigured(self, items: list[pytest.Item]) -> None:
        """For ``pytest_collection_modifyitems``: without the variable, skip every test of the tier, one reason."""
        if self.configured() is not None:
            return
        skip = pytest.mark.skip(reason=self.skip_reason)
        for item in items:
            if self.contains(item):
                item.add_marker(skip)

    def attach_log(self, item: pytest.Item, report: pytest.TestReport) -> None:
        """For ``pytest_runtest_makereport``: a failing test of the tier gets the tail of its server's log (the
        cause is usually only in there)."""
        if report.failed and self.contains(item):
            server = item.config.stash.get(self._server, None)
            if server is not None:
                report.sections.append((f"{self.host} server log (tail)", server.log_tail()))

    def require(self) -> Path:
        """The configured checkout, or skip (for the tier's first session fixture)."""
        path = self.configured()
        if path is None:
            pytest.skip(self.skip_reason)
        return path

    @contextmanager
    def serving(self, server: Server, config: pytest.Config | None = None) -> Iterator[Server]:
        """``server`` started and ready for the block, stopped (by its own PID) after it, whatever happens. With
        ``config``, it is the server whose log failing tests get."""
        if config is not None:
            config.stash[self._server] = server
        server.start()
        try:
            server.wait_ready()
            yield server
        finally:
            server.stop()

    @contextmanager
    def beside(self, server: Server, neighbours: Path, names: tuple[str, ...]) -> Iterator[Any]:
        """``server`` with the neighbour extensions ``names`` (folders of ``neighbours``, as ``tests.hosts setup``
        unpacks them) linked into its data dir's extensions, started; a client of it (long requests allowed)."""
        from webui.server import WebuiClient

        server.prepare_data_dir()
        for name in names:
            (server.data_dir / "extensions" / name).symlink_to(neighbours / name, target_is_directory=True)
        with self.serving(server):
            client = WebuiClient(server, timeout=300)
            try:
                yield client
            finally:
                client.close()

    @contextmanager
    def no_tracebacks(self, client: Client) -> Iterator[None]:
        """Fail the test if the server logged a Traceback while it ran (the API often hides errors in the log)."""
        mark = client.log_mark()
        yield
        found = self.tracebacks(client.log_text(mark))
        if found:
            pytest.fail(f"{self.host} logged a Traceback during the test:\n" + "\n".join(found)[:6000])


# --- leaving no trace: the same check on every host (the probes' fingerprints differ in content, not in use) ---


@dataclass(frozen=True)
class Snapshot:
    """A plain generation's images and the model state it left behind."""

    images: list[np.ndarray]
    fingerprint: dict[str, Any]


def fingerprint(client: Client) -> dict[str, Any]:
    """The probe's checksum of the model and of the host's LoRA/hook state."""
    return client.get("/multilora-probe/fingerprint")


def snapshot(client: Client, run: Callable[[], Any]) -> Snapshot:
    """Run the plain generation ``run`` and take the state it leaves."""
    return Snapshot(run().images, fingerprint(client))


def assert_no_trace(client: Client, run: Callable[[], Any], before: Snapshot) -> None:
    """The state equals the plain generation's, and the next plain generation is bit-identical to it."""
    from webui.server import max_diff

    after = fingerprint(client)
    changed = {key: (value, after.get(key)) for key, value in before.fingerprint.items() if after.get(key) != value}
    assert after == before.fingerprint, f"the generation left a trace: {changed}"
    again = run()
    assert len(again.images) == len(before.images)
    for new, old in zip(again.images, before.images, strict=True):
        assert max_diff(new, old) == 0, "the next plain generation differs"
    assert fingerprint(client) == before.fingerprint, "the next plain generation changed the state"


def interrupted(client: Client, run: Callable[[Any], Any], steps: int) -> Any:
    """``run`` (a generation whose Multi-LoRA pass has ``steps`` steps) on a second client of the same server,
    interrupted once a pass of it has made a few calls (the probes' progress counter, which restarts at every pass's
    ``process``); its result, after checking that the interrupt landed mid-sampling."""
    from webui.server import WebuiClient, trace

    generation = client.get("/multilora-probe/progress")["generation"]
    background = WebuiClient(client.server, timeout=600)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(run, background)
        deadline = time.monotonic() + 120
        while not future.done() and time.monotonic() < deadline:
            progress = client.get("/multilora-probe/progress")
            if progress["generation"] > generation and progress["calls"] >= 3:
                break
            time.sleep(0.02)
        client.post("/sdapi/v1/interrupt")
        result = future.result(timeout=600)
    background.close()
    assert 3 <= len(trace(client)) < steps, "the interrupt landed mid-sampling"
    return result


def assert_each_call_is_the_mean(calls: list[dict[str, Any]], steps: int) -> None:
    """A Composite trace over two LoRAs: one call a step, each the mean of the two single-LoRA outputs (the probe's
    fresh recompute), which differ."""
    assert len(calls) == steps
    for c in calls:
        assert c["active"] == [0, 1]
        assert c["diff_vs_mean"] <= 1e-5, c
        assert c["spread"] > 1e-3, "the two LoRAs give different predictions"


# --- the X/Y/Z plot, as every tier's tests send it -----------------------------------------------------------------


def xyz_args(x_type: int, x_values: str, reforge: bool = False) -> list[Any]:
    """x/y/z plot's positional args (its ui() order, the same on A1111 and Forge): X axis only, legend, sub images,
    text values. reForge's has three more after the legend: individual labels, skip the grid, items per grid (off,
    off, 0)."""
    legend = [True, *((False, False, 0) if reforge else ())]
    return [x_type, x_values, None, 0, "", None, 0, "", None, *legend, True, False, False, False, False, False, 0, True]


def axis_index(client: Client, label: str, img2img: bool = False) -> int:
    """The X type index of an X/Y/Z axis, as the API's script info lists its choices."""
    info = next(
        s for s in client.get("/sdapi/v1/script-info") if s["name"] == "x/y/z plot" and s["is_img2img"] == img2img
    )
    return next(a["choices"] for a in info["args"] if a["label"] == "X type").index(label)
