"""Start a real AUTOMATIC1111 webui (API only, CPU) on a throwaway data dir and talk to it over HTTP.

Only the standard library is imported at module level, so collecting this tier never needs the webui's packages;
numpy, Pillow and requests are imported when a server or client is actually used.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import numpy as np
    import requests

SKIP_REASON = "SD_WEBUI_DIR is not set: real-webui tier skipped"
HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
PROBE_EXTENSION = HERE / "probe_extension"
EXTENSION_LINK_NAME = "sd-webui-multilora"
PROBE_LINK_NAME = "multilora-probe"
REQUEST_TIMEOUT = 60.0
START_TIMEOUT = float(os.environ.get("SD_WEBUI_START_TIMEOUT", "180"))

#: Flags checked against webui 1.10's modules/cmd_args.py (--lora-dir comes from the built-in Lora's preload.py).
BASE_FLAGS = (
    "--api",
    "--nowebui",
    "--use-cpu",
    "all",
    "--no-half",
    "--skip-prepare-environment",
    "--skip-torch-cuda-test",
    "--no-download-sd-model",
    "--skip-version-check",
    "--no-hashing",
)

#: Settings written into the fresh data dir's config.json: no live previews (they would decode latents mid-run).
BASE_SETTINGS: dict[str, Any] = {"live_previews_enable": False}

DEFAULT_TXT2IMG: dict[str, Any] = {
    "prompt": "a photo of a cat",
    "negative_prompt": "",
    "width": 64,
    "height": 64,
    "steps": 8,
    "sampler_name": "Euler",
    "scheduler": "Automatic",
    "seed": 1234,
    "cfg_scale": 7,
    "batch_size": 1,
    "n_iter": 1,
    "send_images": True,
    "save_images": False,
}
DEFAULT_IMG2IMG: dict[str, Any] = {**DEFAULT_TXT2IMG, "denoising_strength": 0.75}


#: errors.report blocks the webui logs for reasons of the environment, not of the code under test.  The extension is
#: linked from a git checkout; one without an ``origin`` remote (a fresh local repo) makes the webui's git-metadata
#: thread report "Failed reading extension data from Git repository" with a traceback.
BENIGN_REPORTS = (re.compile(r"^\*\*\* Failed reading extension data from Git repository \(.*?^---$", re.M | re.S),)


def tracebacks(log: str) -> list[str]:
    """Tracebacks in a piece of server log (with a little context), leaving out BENIGN_REPORTS."""
    for pattern in BENIGN_REPORTS:
        log = pattern.sub("", log)
    found = []
    start = log.find("Traceback")
    while start != -1:
        end = log.find("Traceback", start + 1)
        found.append(log[max(0, start - 300) : end if end != -1 else start + 4000])
        start = end
    return found


def webui_dir_from_env() -> Path | None:
    """The webui checkout named by ``$SD_WEBUI_DIR``, or None when the tier is not configured."""
    value = os.environ.get("SD_WEBUI_DIR", "").strip()
    return Path(value).resolve() if value else None


def webui_python() -> str:
    """Interpreter for the webui: ``$SD_WEBUI_PYTHON`` or the one running the tests."""
    return os.environ.get("SD_WEBUI_PYTHON", "").strip() or sys.executable


def free_port() -> int:
    """A currently free loopback port (tiny race window; fine for a test server)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env() -> dict[str, str]:
    """Environment for the webui: 1 OpenMP thread (2-core machines), offline hubs, unbuffered logs."""
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONIOENCODING": "utf-8",
        }
    )
    # the webui's launcher reads extra flags from here; ours must be the only ones
    env.pop("COMMANDLINE_ARGS", None)
    return env


def stop_process(proc: subprocess.Popen[Any], grace: float) -> None:
    """Terminate a process we started, by its PID; kill it if it lingers."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=grace)


@dataclass
class WebuiServer:
    """A webui process on 127.0.0.1 with its own data dir, checkpoint and LoRA dir; stopped by its own PID."""

    #: the host's test probe, linked into extensions/ beside ours
    probe_extension: ClassVar[Path] = PROBE_EXTENSION
    webui_dir: Path
    data_dir: Path
    ckpt: Path
    lora_dir: Path
    python: str = field(default_factory=webui_python)
    port: int = field(default_factory=free_port)
    extra_flags: tuple[str, ...] = ()
    with_extension: bool = True
    #: the checkout linked in as the extension (another one: bench/pass_start.py times an earlier commit)
    extension: Path = REPO_ROOT
    #: the gradio UI too (``--nowebui`` left out; the API stays on), for the browser tier and ``tests.hosts run``
    ui: bool = False
    proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "webui-server.log"

    def flags(self, flags: tuple[str, ...]) -> list[str]:
        """The host's base flags, less ``--nowebui`` when the UI is wanted."""
        return [flag for flag in flags if not (self.ui and flag == "--nowebui")]

    def command(self) -> list[str]:
        return [
            self.python,
            "launch.py",
            *self.flags(BASE_FLAGS),
            "--server-name",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--ckpt",
            str(self.ckpt),
            "--lora-dir",
            str(self.lora_dir),
            *self.extra_flags,
        ]

    def prepare_data_dir(self) -> None:
        """Fresh data dir: our extension and the probe linked into extensions/, settings pre-seeded."""
        extensions = self.data_dir / "extensions"
        extensions.mkdir(parents=True, exist_ok=True)
        links = [(PROBE_LINK_NAME, self.probe_extension)]
        if self.with_extension:
            links.append((EXTENSION_LINK_NAME, self.extension))
        for name, target in links:
            link = extensions / name
            if not link.exists():
                link.symlink_to(target, target_is_directory=True)
        config = self.data_dir / "config.json"
        if not config.exists():
            config.write_text(json.dumps(BASE_SETTINGS, indent=2), encoding="utf-8")

    def start(self) -> None:
        self.prepare_data_dir()
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.command())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.webui_dir,
                env=server_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until the API answers and the checkpoint is loaded (the webui loads it in a background thread)."""
        import requests

        deadline = time.monotonic() + timeout
        last_error = "no answer yet"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"webui exited with code {self.proc.returncode} during startup\n{self.log_tail()}")
            if "Stable diffusion model failed to load" in self.log_text():
                raise RuntimeError(f"webui could not load the test checkpoint\n{self.log_tail()}")
            if self.ui and "Startup time:" not in self.log_text():
                # with the UI, the webui adds its API's middleware while gradio already serves: a request in between
                # fails the startup ("Cannot add middleware after an application has started"), so none before this
                last_error = "no startup line in the log yet"
                time.sleep(0.5)
                continue
            try:
                status = requests.get(f"{self.base_url}/multilora-probe/status", timeout=5).json()
                if status.get("model_loaded"):
                    return
                last_error = f"probe status {status}"
            except (requests.RequestException, ValueError) as exc:
                last_error = repr(exc)
            time.sleep(0.5)
        raise RuntimeError(f"webui not ready after {timeout:.0f}s ({last_error})\n{self.log_tail()}")

    def stop(self, grace: float = 20.0) -> None:
        """Terminate our process (SIGTERM shuts uvicorn down cleanly), kill it if it lingers."""
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc, grace)

    def log_text(self, since: int = 0) -> str:
        """Server output from byte offset ``since`` (see :meth:`log_mark`)."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(since)
                return fh.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_mark(self) -> int:
        """Current end of the log, to read only what a test caused."""
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_tail(self, n_chars: int = 6000) -> str:
        text = self.log_text()
        return text[-n_chars:]


class WebuiError(RuntimeError):
    """Non-2xx answer from the webui; carries the status code and body (the webui puts the error text there)."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:2000]}")
        self.status = status
        self.body = body


@dataclass
class Result:
    """A txt2img/img2img answer: decoded RGB images, parsed ``info`` JSON and the first infotext."""

    images: list[np.ndarray]
    info: dict[str, Any]
    infotext: str
    raw: dict[str, Any] = field(repr=False)

    @property
    def image(self) -> np.ndarray:
        """The first image."""
        return self.images[0]


def max_diff(a: np.ndarray, b: np.ndarray) -> int:
    """Largest per-channel pixel difference of two uint8 images (0..255): "the same image" within float noise."""
    import numpy as np

    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def mean_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-channel pixel difference of two uint8 images (0..255): "a different image" when clearly above 0."""
    import numpy as np

    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


#: "The same image": the largest pixel difference two exact computation paths may show.
SAME = 2
#: The most the noise floor may be for SAME to tell right from wrong. The random models are chaotic at strong LoRA
#: weights (at 1.0, swapping two LoRAs' merge order alone moved pixels 14/255); a comparison of two paths runs where
#: the reference computed two exact ways (e.g. that merge order swapped) stays within this, measured in the test.
NOISE_FLOOR = 1


def assert_noise_floor(a: np.ndarray, b: np.ndarray) -> None:
    """Fail when two exact computations of one reference differ by more than NOISE_FLOOR: the strength is then too
    chaotic for a SAME comparison to mean anything."""
    floor = max_diff(a, b)
    assert floor <= NOISE_FLOOR, f"noise floor {floor}/255 > {NOISE_FLOOR}: too chaotic at this strength"


def trace(webui: WebuiClient) -> list[dict[str, Any]]:
    """The Multi-LoRA inner-model calls of the last generation, as the test probe recorded them."""
    return webui.get("/multilora-probe/trace")["calls"]


def decode_image(data: str) -> np.ndarray:
    """Base64 PNG (as the API returns it) -> uint8 HxWx3."""
    import numpy as np
    from PIL import Image

    if data.startswith("data:"):
        data = data.split(",", 1)[1]
    with Image.open(io.BytesIO(base64.b64decode(data))) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8)


def encode_image(image: np.ndarray) -> str:
    """uint8 HxWx3 -> base64 PNG for init_images/mask fields."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class WebuiClient:
    """Small HTTP client for the test server; payload defaults make a 64x64, 8-step Euler image with a fixed seed."""

    def __init__(self, server: WebuiServer, timeout: float = REQUEST_TIMEOUT) -> None:
        import requests

        self.server = server
        self.base_url = server.base_url
        self.timeout = timeout
        self.session: requests.Session = requests.Session()

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Raw request (no status check), for tests that look at error answers."""
        kwargs.setdefault("timeout", self.timeout)
        return self.session.request(method, self.base_url + path, **kwargs)

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        if not response.ok:
            raise WebuiError(method, path, response.status_code, response.text)
        return response.json()

    def get(self, path: str) -> Any:
        """GET, raising WebuiError on a non-2xx answer; returns the parsed JSON."""
        return self._json("GET", path)

    def post(self, path: str, json: Any = None) -> Any:
        """POST JSON, raising WebuiError on a non-2xx answer; returns the parsed JSON."""
        return self._json("POST", path, json=json)

    @staticmethod
    def _result(raw: dict[str, Any]) -> Result:
        info = raw.get("info")
        parsed = json.loads(info) if isinstance(info, str) and info else {}
        infotexts = parsed.get("infotexts") or [""]
        return Result(
            images=[decode_image(img) for img in raw.get("images") or []],
            info=parsed,
            infotext=infotexts[0],
            raw=raw,
        )

    def txt2img(self, **payload: Any) -> Result:
        """POST /sdapi/v1/txt2img with DEFAULT_TXT2IMG overridden by payload."""
        return self._result(self.post("/sdapi/v1/txt2img", {**DEFAULT_TXT2IMG, **payload}))

    def img2img(self, **payload: Any) -> Result:
        """POST /sdapi/v1/img2img; numpy arrays in ``init_images`` (and ``mask``) are PNG-encoded for you."""
        body = {**DEFAULT_IMG2IMG, **payload}
        images = body.get("init_images") or []
        body["init_images"] = [img if isinstance(img, str) else encode_image(img) for img in images]
        if body.get("mask") is not None and not isinstance(body["mask"], str):
            body["mask"] = encode_image(body["mask"])
        return self._result(self.post("/sdapi/v1/img2img", body))

    def scripts(self) -> Mapping[str, list[str]]:
        """GET /sdapi/v1/scripts: lower-cased script titles per tab."""
        return self.get("/sdapi/v1/scripts")

    def probe_load(self, names: list[str], **multipliers: list[float]) -> dict[str, Any]:
        """Load networks via the probe (reports module counts and unmatched file modules), then unload them."""
        return self.post("/multilora-probe/load", {"names": names, **multipliers})

    def loaded_networks(self) -> list[dict[str, Any]]:
        """The Lora extension's loaded_networks as left by the last generation."""
        return self.get("/multilora-probe/networks")

    def network_errors(self) -> dict[str, int]:
        """Per-network count of layers the Lora extension failed to apply."""
        return self.get("/multilora-probe/errors")

    def log_text(self, since: int = 0) -> str:
        return self.server.log_text(since)

    def log_mark(self) -> int:
        return self.server.log_mark()

    def close(self) -> None:
        self.session.close()
