"""A host's full UI with this repository installed, on the test tiers' tiny model and LoRAs: ``python -m tests.hosts
run HOST`` (:func:`serve`) and the browser tier (``tests/browser``) start it with the same :func:`ui_server`.

The model builders import the host's packages, so they run as subprocesses with the host's python; this module
itself runs with any python that has ``requests`` (the servers' readiness checks use it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .setup import Host

TESTS_DIR = Path(__file__).resolve().parents[1]
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))  # the tiers import each other as top-level packages (``webui.server``)

from forge.server import HOSTS as FORGE_HOSTS  # noqa: E402
from forge.server import ForgeServer  # noqa: E402
from forge.server import build_assets as build_forge_assets  # noqa: E402
from webui.server import REPO_ROOT, WebuiServer, free_port, server_env  # noqa: E402


def build_assets(name: str, webui_dir: Path, python: str, folder: Path, sdxl: bool = False) -> tuple[Path, Path]:
    """Build host ``name``'s tier's tiny model and its LoRAs (mlA, mlB, ... as that tier's fixtures do; ``sdxl``:
    the Forge tier's SDXL model, mlxA, mlxB...) into ``folder`` with the host's ``python``; return the checkpoint and
    the LoRA folder."""
    if name in FORGE_HOSTS:
        manifest = build_forge_assets(webui_dir, folder, python=python, sdxl=sdxl)
        return Path(manifest["ckpt"]), Path(manifest["lora_dir"])
    if sdxl:
        raise ValueError(f"no SDXL assets for {name} here (the Forge tier's builder makes them)")
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "build.log"
    command = [python, "-m", "tests.webui.tiny_lora", str(folder), "--webui-dir", str(webui_dir)]
    with open(log, "wb") as fh:
        done = subprocess.run(command, cwd=REPO_ROOT, env=server_env(), stdout=subprocess.PIPE, stderr=fh)
    if done.returncode:
        raise RuntimeError(f"building the tiny model failed ({done.returncode}):\n{log.read_text()[-4000:]}")
    paths = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return Path(paths["ckpt"]), Path(paths["lora_dir"])


def host_server(
    name: str, webui_dir: Path, python: str, ckpt: Path, lora_dir: Path, data_dir: Path, **options: Any
) -> WebuiServer:
    """Host ``name``'s server class (``a1111``, or ``forge``/``reforge``: the Forge tier's) on that checkpoint and
    LoRA folder, with this repository and the tier's probe installed; ``options`` are the server's fields (``ui``,
    ``port``...). Not started yet."""
    paths = {"webui_dir": webui_dir, "data_dir": data_dir, "ckpt": ckpt, "lora_dir": lora_dir, "python": python}
    if name in FORGE_HOSTS:
        return ForgeServer(**paths, host=name, **options)
    return WebuiServer(**paths, **options)


def ui_server(name: str, webui_dir: Path, python: str, folder: Path, port: int | None = None) -> WebuiServer:
    """Host ``name``'s server with its gradio UI (``ui=True``), its model and LoRAs built into ``folder/models``
    and its data dir ``folder/data``; not started yet."""
    ckpt, lora_dir = build_assets(name, webui_dir, python, folder / "models")
    return host_server(name, webui_dir, python, ckpt, lora_dir, folder / "data", port=port or free_port(), ui=True)


def serve(host: Host, port: int) -> int:
    """Build the assets into a temporary folder, start the UI on 127.0.0.1:``port`` and wait for Ctrl-C (or the
    server's own exit); stop it and remove the folder. Returns the exit status for ``python -m tests.hosts run``."""
    folder = Path(tempfile.mkdtemp(prefix=f"multilora-{host.recipe.name}-ui-"))
    server: WebuiServer | None = None
    try:
        print(f"building the tiny model and LoRAs in {folder / 'models'}", flush=True)
        server = ui_server(host.recipe.name, host.webui_dir, str(host.python), folder, port)
        print(f"starting {host.recipe.name} (log: {server.log_path})", flush=True)
        server.start()
        server.wait_ready()
        print(f"{host.recipe.name} with sd-webui-multilora: {server.base_url}/  (Ctrl-C stops it)", flush=True)
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(1)
        print(f"{host.recipe.name} exited on its own; its log:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as exc:  # a build or a startup that failed: the message carries the log's tail
        print(f"tests.hosts run: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)
