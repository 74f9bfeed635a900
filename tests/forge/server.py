"""Start a real Stable Diffusion WebUI Forge (API only, CPU) on a throwaway data dir: the A1111 tier's
:class:`~webui.server.WebuiServer` with Forge's command line, probe and readiness rule. The client, the image helpers
and the log handling are the A1111 tier's (``tests/webui/server.py``).

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from webui.server import (
    DEFAULT_TXT2IMG,
    WebuiServer,
    server_env,
)
from webui.server import tracebacks as webui_tracebacks

SKIP_REASON = "SD_FORGE_DIR is not set: real-Forge tier skipped"
HERE = Path(__file__).resolve().parent
PROBE_EXTENSION = HERE / "probe_extension"
START_TIMEOUT = float(os.environ.get("SD_FORGE_START_TIMEOUT", "240"))

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
#: thread's, for a checkout without an ``origin`` remote.
BENIGN_REPORTS = (re.compile(r"^\*\*\* Failed reading extension data from Git repository \(.*?^---$", re.M | re.S),)


def tracebacks(log: str) -> list[str]:
    """Tracebacks in a piece of Forge's log, leaving out BENIGN_REPORTS (and the A1111 tier's)."""
    for pattern in BENIGN_REPORTS:
        log = pattern.sub("", log)
    return webui_tracebacks(log)


def forge_dir_from_env() -> Path | None:
    """The Forge checkout named by ``$SD_FORGE_DIR``, or None when the tier is not configured."""
    value = os.environ.get("SD_FORGE_DIR", "").strip()
    return Path(value).resolve() if value else None


def forge_python() -> str:
    """Interpreter for Forge and the model builder: ``$SD_FORGE_PYTHON`` or the one running the tests."""
    return os.environ.get("SD_FORGE_PYTHON", "").strip() or sys.executable


def build_assets(forge_dir: Path, out_dir: Path, seed: int = 0, python: str | None = None) -> dict[str, Any]:
    """Run ``tiny_model.py`` with Forge's python (``python``, default :func:`forge_python`: it imports Forge's
    backend, which the test process must not); return its manifest."""
    log = out_dir / "build.log"
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [
        python or forge_python(),
        str(HERE / "tiny_model.py"),
        str(out_dir),
        "--forge",
        str(forge_dir),
        "--seed",
        str(seed),
    ]
    with open(log, "wb") as fh:
        done = subprocess.run(command, cwd=forge_dir, env=server_env(), stdout=fh, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"building the tiny model failed ({done.returncode}):\n{log.read_text()[-4000:]}")
    return json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))


@dataclass
class ForgeServer(WebuiServer):
    """A Forge process on 127.0.0.1 with its own data dir, checkpoint and LoRA dir; stopped by its own PID."""

    probe_extension: ClassVar[Path] = PROBE_EXTENSION
    python: str = field(default_factory=forge_python)

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

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until the API answers, then make one 1-step image: Forge loads the checkpoint on the first
        generation, not at startup, and the probe must then report it loaded."""
        import requests

        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"Forge exited with code {self.proc.returncode} during startup\n{self.log_tail()}")
            try:
                requests.get(f"{self.base_url}/multilora-probe/status", timeout=5).raise_for_status()
                break
            except requests.RequestException as exc:
                last_error = repr(exc)
            time.sleep(0.5)
        else:
            raise RuntimeError(f"Forge not ready after {timeout:.0f}s ({last_error})\n{self.log_tail()}")
        warm_up = {**DEFAULT_TXT2IMG, "steps": 1}
        response = requests.post(
            f"{self.base_url}/sdapi/v1/txt2img", json=warm_up, timeout=max(1, deadline - time.monotonic())
        )
        status = requests.get(f"{self.base_url}/multilora-probe/status", timeout=5).json()
        if not response.ok or not status.get("model_loaded"):
            raise RuntimeError(f"Forge could not load the test checkpoint ({status})\n{self.log_tail()}")
