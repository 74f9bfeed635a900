"""Start a real Stable Diffusion WebUI Forge (API only, CPU) on a throwaway data dir: the A1111 tier's
:class:`~webui.server.WebuiServer` with Forge's command line, probe and readiness rule. The client, the image helpers
and the log handling are the A1111 tier's (``tests/webui/server.py``).

The tier runs against one of two hosts, ``$MULTILORA_FORGE_HOST``: ``forge`` (the default: lllyasviel's Forge, its
``backend``) or ``reforge`` (Panchovix's reForge, the older Forge backend on ``ldm_patched``), each configured by its
own variables (``tests/hosts/recipes.py``: ``SD_FORGE_DIR``/``SD_FORGE_PYTHON`` or
``SD_REFORGE_DIR``/``SD_REFORGE_PYTHON``). Both start with the same flags; the readiness wait restarts a server
whose API thread died during startup (:data:`DEAD_API`: seen on reForge).

Only the standard library is imported at module level (and the A1111 tier's server module, which holds to the same
rule), so collecting this tier never needs Forge's packages.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from hosts.recipes import RECIPES
from webui.server import (
    DEFAULT_TXT2IMG,
    WebuiServer,
    server_env,
)
from webui.server import tracebacks as webui_tracebacks

#: The hosts this tier runs against (``$MULTILORA_FORGE_HOST``) and their names in messages.
HOSTS = {"forge": "Forge", "reforge": "reForge"}


def forge_host() -> str:
    """The host under test: ``$MULTILORA_FORGE_HOST``, ``forge`` by default."""
    name = os.environ.get("MULTILORA_FORGE_HOST", "").strip().lower() or "forge"
    if name not in HOSTS:
        raise RuntimeError(f"MULTILORA_FORGE_HOST={name!r}: one of {', '.join(HOSTS)}")
    return name


HOST = forge_host()
#: The host's name in messages ("Forge", "reForge").
HOST_LABEL = HOSTS[HOST]
REFORGE = HOST == "reforge"
SKIP_REASON = f"{RECIPES[HOST].dir_var} is not set: real-{HOST_LABEL} tier skipped"
HERE = Path(__file__).resolve().parent
PROBE_EXTENSION = HERE / "probe_extension"
START_TIMEOUT = float(os.environ.get("SD_FORGE_START_TIMEOUT", "240"))
#: How long a server may have logged its startup line without its port answering before it is restarted.
STALL_TIMEOUT = 60.0
#: Restarts of a server whose API never came up (see DEAD_API) before the start fails.
RESTARTS = 2
#: The API thread died while the model loaded: the process stays up and never listens. Seen on reForge about one
#: start in ten (``SystemError: ... bad argument to internal function`` from ``modules/api/api.py``).
DEAD_API = re.compile(r"^Exception in thread .*\((?:api_only|webui)_worker\)|bad argument to internal function", re.M)

#: Flags checked against Forge's modules/cmd_args.py and backend/args.py (--lora-dir: its built-in Lora's preload).
#: Forge installs nothing with --skip-prepare-environment/--skip-install, and runs on the CPU with --always-cpu.
FORGE_FLAGS = (
    "--api",
    "--nowebui",
    "--always-cpu",
    "--skip-prepare-environment",
    "--skip-install",
    "--skip-version-check",
    "--skip-python-version-check",
    "--skip-torch-cuda-test",
    "--no-download-sd-model",
    "--no-hashing",
)

#: Reports Forge logs for reasons of the environment, not of the code under test: as on A1111, the git-metadata
#: thread's, for a checkout without an ``origin`` remote; with the UI, reForge's gradio queue's when a browser page
#: goes away while it waits on the page's websocket (``WebSocketDisconnect: 1001``, "going away": a closed page).
BENIGN_REPORTS = (
    re.compile(r"^\*\*\* Failed reading extension data from Git repository \(.*?^---$", re.M | re.S),
    re.compile(
        r"^ERROR:    Exception in ASGI application\nTraceback \(most recent call last\):\n"
        r"(?:(?!Traceback \().)*?^starlette\.websockets\.WebSocketDisconnect: 1001$",
        re.M | re.S,
    ),
)


#: Starlette's middleware as reForge pins it chains two exceptions of its own plumbing (anyio's ``WouldBlock`` and
#: ``EndOfStream``) before the real one in every API error report: links of that report, not tracebacks of their own.
ANYIO_LINKS = re.compile(
    r"Traceback \(most recent call last\):(?:(?!Traceback \().)*?anyio\.(?:WouldBlock|EndOfStream)\s+"
    r"During handling of the above exception, another exception occurred:\s+",
    re.S,
)


def traceback_count(log: str) -> int:
    """How many tracebacks a piece of the host's log holds, an error report's anyio links (ANYIO_LINKS) not counted."""
    return ANYIO_LINKS.sub("", log).count("Traceback (most recent call last)")


def tracebacks(log: str) -> list[str]:
    """Tracebacks in a piece of Forge's log, leaving out BENIGN_REPORTS (and the A1111 tier's)."""
    for pattern in BENIGN_REPORTS:
        log = pattern.sub("", log)
    return webui_tracebacks(log)


def forge_dir_from_env(host: str = HOST) -> Path | None:
    """The checkout named by the host's variable (``$SD_FORGE_DIR``, ``$SD_REFORGE_DIR``), or None when the tier is
    not configured."""
    value = os.environ.get(RECIPES[host].dir_var, "").strip()
    return Path(value).resolve() if value else None


def forge_python(host: str = HOST) -> str:
    """Interpreter for the host and the model builder: ``$SD_FORGE_PYTHON`` (``$SD_REFORGE_PYTHON``) or the one
    running the tests."""
    return os.environ.get(RECIPES[host].python_var, "").strip() or sys.executable


def neighbours_dir_from_env(host: str = HOST) -> Path | None:
    """The unpacked neighbour extensions (``$SD_FORGE_NEIGHBOURS``, ``$SD_REFORGE_NEIGHBOURS``: tests.hosts setup)."""
    value = os.environ.get(RECIPES[host].dir_var.removesuffix("_DIR") + "_NEIGHBOURS", "").strip()
    return Path(value) if value else None


def build_assets(
    forge_dir: Path,
    out_dir: Path,
    seed: int = 0,
    python: str | None = None,
    sdxl: bool = False,
    script: str = "tiny_model.py",
    sd15: bool = False,
) -> dict[str, Any]:
    """Run ``tiny_model.py`` (``--sdxl``: the SDXL model and its LoRAs; ``--sd15``: the benchmark's full-size SD1.5
    and its rank-16 LoRAs; ``script``: another builder of this folder
    with the same command line, ``tiny_dit.py``) with the host's python (``python``, default :func:`forge_python`: it
    imports the host's model classes, which the test process must not); return its manifest."""
    log = out_dir / "build.log"
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [
        python or forge_python(),
        str(HERE / script),
        str(out_dir),
        "--forge",
        str(forge_dir),
        "--seed",
        str(seed),
        *(["--sdxl"] if sdxl else []),
        *(["--sd15"] if sd15 else []),
    ]
    with open(log, "wb") as fh:
        done = subprocess.run(command, cwd=forge_dir, env=server_env(), stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"building the tiny model failed ({done.returncode}):\n{log.read_text()[-4000:]}")
    return json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))


@dataclass
class ForgeServer(WebuiServer):
    """A Forge (or reForge: ``host``) process on 127.0.0.1 with its own data dir, checkpoint and LoRA dir; stopped
    by its own PID."""

    probe_extension: ClassVar[Path] = PROBE_EXTENSION
    #: ``forge`` or ``reforge`` (default: ``$MULTILORA_FORGE_HOST``); ``python`` defaults to that host's
    host: str = HOST
    python: str = ""
    #: where this start's part of the log begins (a restart appends to the same log)
    start_mark: int = 0

    def __post_init__(self) -> None:
        self.python = self.python or forge_python(self.host)

    @property
    def label(self) -> str:
        return HOSTS[self.host]

    def command(self) -> list[str]:
        return [
            self.python,
            "launch.py",
            *self.flags(FORGE_FLAGS),
            "--server-name",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--ckpt",
            str(self.ckpt),
            "--ckpt-dir",
            str(self.ckpt.parent),
            "--lora-dir",
            str(self.lora_dir),
            # with --data-dir, Forge's gradio serves files from the data dir only: its own page scripts need this
            *(("--gradio-allowed-path", str(self.webui_dir)) if self.ui else ()),
            *self.extra_flags,
        ]

    def start(self) -> None:
        self.start_mark = self.log_mark()
        super().start()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until the API answers, then make one 1-step image: Forge loads the checkpoint on the first
        generation, not at startup, and the probe must then report it loaded. A server whose API thread died
        (:data:`DEAD_API`), or that logged its startup line :data:`STALL_TIMEOUT` s ago and still does not answer, is
        restarted, up to :data:`RESTARTS` times; each start has ``timeout``."""
        import requests

        for attempt in range(RESTARTS + 1):
            problem = self._wait_for_api(timeout)
            if problem is None:
                break
            if attempt == RESTARTS or problem.startswith("not ready"):
                raise RuntimeError(f"{self.label} {problem}\n{self.log_tail()}")
            self.stop()
            with open(self.log_path, "ab") as log:
                log.write(f"\n*** multilora tests: {problem}: restarting the server\n".encode())
            self.start()
        deadline = time.monotonic() + timeout
        warm_up = {**DEFAULT_TXT2IMG, "steps": 1}
        response = requests.post(
            f"{self.base_url}/sdapi/v1/txt2img", json=warm_up, timeout=max(1, deadline - time.monotonic())
        )
        status = requests.get(f"{self.base_url}/multilora-probe/status", timeout=5).json()
        if not response.ok or not status.get("model_loaded"):
            raise RuntimeError(f"{self.label} could not load the test checkpoint ({status})\n{self.log_tail()}")

    def _wait_for_api(self, timeout: float) -> str | None:
        """None once the probe answers; else why not: ``not ready ...`` (give up), or a reason to restart."""
        import requests

        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        started_at: float | None = None  # when this start's log showed its startup line
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.label} exited with code {self.proc.returncode} during startup\n{self.log_tail()}"
                )
            log = self.log_text(self.start_mark)
            if DEAD_API.search(log):
                return "API thread died during startup"
            if started_at is None and "Startup time:" in log:
                started_at = time.monotonic()
            # reForge with its UI adds the API's middleware while gradio already serves, as A1111 does (WebuiServer):
            # a request in between fails the startup
            if started_at is not None or not (self.ui and self.host == "reforge"):
                try:
                    requests.get(f"{self.base_url}/multilora-probe/status", timeout=5).raise_for_status()
                    return None
                except requests.RequestException as exc:
                    last_error = repr(exc)
            if started_at is not None and time.monotonic() - started_at > STALL_TIMEOUT:
                return f"no answer {STALL_TIMEOUT:.0f}s after its startup line"
            time.sleep(0.5)
        return f"not ready after {timeout:.0f}s ({last_error})"
