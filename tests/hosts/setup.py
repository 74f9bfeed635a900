"""Unpack a host from ../shared/hosts and build its venv by its recipe, once per tarball and recipe.

The result lives in a cache folder outside the repository (``$MULTILORA_HOSTS_CACHE``, default
``/var/tmp/sd-webui-multilora-hosts``: no folder on the path may start with a dot, as A1111's gradio 3.41 refuses to
serve a file from such a path, its own page scripts included), in ``<host>-<key>/`` where the key hashes the
tarball, the recipe and ``BUILD_STEPS``. A folder is used only once its ``ready.json`` is written, the last step, so
an interrupted build is rebuilt from scratch at the next call and a finished one is found in well under a second.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .recipes import RECIPES, Recipe

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Bump when the steps below change what a build produces: old caches are then rebuilt.
BUILD_STEPS = 1
#: The CPU torch wheel on this project's machines (pip's find-links has it), pinned so nothing pulls a CUDA build.
TORCH = "torch==2.13.0+cpu"
#: The torchvision that pairs with that torch, without dependencies (PyPI's is a CUDA build: see _guard_torchvision).
TORCHVISION = "torchvision==0.28.0"
VENV_PYTHON = "python3.11"


class SetupError(RuntimeError):
    """A step failed; the message is the one line the user sees (which host, which step, why)."""


@dataclass(frozen=True)
class Host:
    """A built host: its checkout and the venv python that runs it (and its tier's pytest)."""

    recipe: Recipe
    webui_dir: Path
    python: Path
    #: the neighbour extensions, unpacked (one folder each), for the tier to link into its data dir's extensions/
    neighbours_dir: Path

    def env(self) -> dict[str, str]:
        """The variables the host's test tier reads."""
        return {
            self.recipe.dir_var: str(self.webui_dir),
            self.recipe.python_var: str(self.python),
            self.recipe.dir_var.removesuffix("_DIR") + "_NEIGHBOURS": str(self.neighbours_dir),
        }


def hosts_dir() -> Path:
    """Where the tarballs are: ``$MULTILORA_HOSTS_DIR`` or ``../shared/hosts`` beside this checkout."""
    value = os.environ.get("MULTILORA_HOSTS_DIR", "").strip()
    return Path(value) if value else REPO_ROOT.parent / "shared" / "hosts"


def cache_root() -> Path:
    value = os.environ.get("MULTILORA_HOSTS_CACHE", "").strip()
    return Path(value) if value else Path("/var/tmp/sd-webui-multilora-hosts")


def tarball(pattern: str) -> Path:
    """The one tarball matching ``pattern`` in :func:`hosts_dir`."""
    found = sorted(hosts_dir().glob(pattern))
    if not found:
        raise SetupError(f"no {pattern} in {hosts_dir()} (set MULTILORA_HOSTS_DIR to the folder with the tarballs)")
    if len(found) > 1:
        raise SetupError(f"several {pattern} in {hosts_dir()}: {', '.join(p.name for p in found)}")
    return found[0]


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_key(recipe: Recipe, source: str) -> str:
    """Hash of the source (a tarball's content hash or a checkout's path), the recipe and the build steps."""
    text = json.dumps([source, repr(recipe), BUILD_STEPS, TORCH, TORCHVISION])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _run(step: str, recipe: Recipe, command: list[str], log: Path, cwd: Path | None = None) -> None:
    """Run one build step, its output appended to ``log``; a failure raises with the step and the log's last line."""
    with open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(command)}\n".encode())
        fh.flush()
        done = subprocess.run(command, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if done.returncode:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        raise SetupError(
            f"{recipe.name}: {step} failed (exit {done.returncode}): {lines[-1] if lines else '?'} (log: {log})"
        )


def requirements(recipe: Recipe, webui_dir: Path) -> list[str]:
    """The host's ``requirements_versions.txt`` (CRLF stripped) with the recipe's replacements and extras."""
    replaced = dict(recipe.replace)
    lines = []
    for raw in (webui_dir / "requirements_versions.txt").read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name = re.split(r"[<>=!~\[ @;]", line, maxsplit=1)[0].lower().replace("_", "-")
        if line.startswith(("http://", "https://")):
            name = line.rsplit("/", 1)[-1].split("-", 1)[0].lower()
        line = replaced.get(name, line)
        if line:
            lines.append(line)
    return lines + list(recipe.extra)


def _guard_torchvision(python: Path) -> None:
    """PyPI's torchvision is a CUDA build: beside CPU torch its ops do not load, and two unconditional
    ``register_fake`` decorators in ``_meta_registrations.py`` then fail the import ("operator torchvision::nms does
    not exist"). Make them conditional on ``_has_ops()``, as the rest of that file is (txt2img never uses them)."""
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    path = Path(site) / "torchvision" / "_meta_registrations.py"
    text = path.read_text(encoding="utf-8")
    guarded = re.sub(
        r'^@torch\.library\.register_fake\("torchvision::(q?nms)"\)$',
        r'@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))',
        text,
        flags=re.M,
    )
    if guarded == text and "_has_ops() else (lambda f: f)" not in text:
        raise SetupError(f"torchvision guard: no register_fake for nms/qnms in {path}")
    path.write_text(guarded, encoding="utf-8")


def unpack(recipe: Recipe, source: Path, into: Path) -> Path:
    """Unpack a snapshot (one top folder, ../shared/hosts/README.md) into ``into``; its top folder."""
    with tarfile.open(source) as tar:
        tops = {member.name.split("/", 1)[0] for member in tar.getmembers()}
        if len(tops) != 1:
            raise SetupError(f"{recipe.name}: {source.name} has {len(tops)} top folders, expected one")
        tar.extractall(into, filter="fully_trusted")
    return into / tops.pop()


def build(recipe: Recipe, folder: Path, source: Path, log: Path) -> Host:
    """Unpack (or link) the host into ``folder`` and build its venv there, with its tier's packages and the
    neighbour extensions."""
    webui_dir = source.resolve() if source.is_dir() else unpack(recipe, source, folder)
    neighbours_dir = folder / "neighbours"
    neighbours_dir.mkdir()
    needs = []  # resolved with the host's own, as their install.py would add them to its venv
    for pattern in recipe.neighbours:
        extension = unpack(recipe, tarball(pattern), neighbours_dir)
        if (extension / "requirements.txt").is_file():
            needs += ["-r", str(extension / "requirements.txt")]
    needs += recipe.neighbour_needs
    venv = folder / "venv"
    _run("creating the venv", recipe, [VENV_PYTHON, "-m", "venv", str(venv)], log)
    python = venv / "bin" / "python"
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    constraints = folder / "constraints.txt"
    constraints.write_text("\n".join([TORCH, *recipe.neighbour_pins]) + "\n", encoding="utf-8")
    req_file = folder / "requirements.txt"
    req_file.write_text("\n".join(requirements(recipe, webui_dir)) + "\n", encoding="utf-8")
    _run("installing torch", recipe, [*pip, TORCH], log)
    _run("installing torchvision", recipe, [*pip, "--no-deps", TORCHVISION], log)
    step = "installing the host's (and its neighbours') requirements"
    _run(step, recipe, [*pip, "-c", str(constraints), "-r", str(req_file), *needs], log)
    _guard_torchvision(python)
    frozen = folder / "frozen.txt"
    with open(frozen, "wb") as fh:
        subprocess.run([str(python), "-m", "pip", "freeze"], stdout=fh, check=True)
    # the tier's own packages may not move the host's: its installed versions are constraints
    _run("installing the test tier's packages", recipe, [*pip, "-c", str(frozen), *recipe.tier], log)
    _run("importing torch and torchvision", recipe, [str(python), "-c", "import torch, torchvision"], log)
    return Host(recipe, webui_dir, python, neighbours_dir)


def setup(name: str, checkout: Path | None = None) -> Host:
    """The built host ``name``: from the cache when its key matches, else built now."""
    recipe = RECIPES.get(name)
    if recipe is None:
        raise SetupError(f"unknown host {name!r}: one of {', '.join(RECIPES)}")
    source = checkout if checkout is not None else tarball(recipe.tarball)
    if checkout is not None and not (checkout / "launch.py").is_file():
        raise SetupError(f"{name}: {checkout} is not a webui checkout (no launch.py)")
    key = cache_key(recipe, str(checkout.resolve()) if checkout is not None else _file_hash(source))
    folder = cache_root() / f"{name}-{key}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second setup of the same host waits for the first one's build
        ready = folder / "ready.json"
        if ready.is_file():
            data = json.loads(ready.read_text(encoding="utf-8"))
            return Host(recipe, Path(data["webui_dir"]), Path(data["python"]), Path(data["neighbours_dir"]))
        if folder.exists():
            shutil.rmtree(folder)  # an earlier build stopped half-way
        folder.mkdir()
        log = folder / "setup.log"
        print(f"setting up {name} from {source} in {folder} (log: {log})", file=sys.stderr, flush=True)
        host = build(recipe, folder, source, log)
        paths = {"webui_dir": host.webui_dir, "python": host.python, "neighbours_dir": host.neighbours_dir}
        ready.write_text(json.dumps({k: str(v) for k, v in paths.items()}), encoding="utf-8")
        return host
