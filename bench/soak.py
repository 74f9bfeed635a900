"""Soak: many random API generations against a real host, checking after each one that Multi-LoRA left no trace.

Starts its own API-only host on the CPU (A1111, Forge or reForge: the test tiers' servers) in a temporary data dir
with that tier's tiny random SD1 model and its five test LoRAs (A1111: mlA/mlB/mlC/mlLocon/mlLoha; Forge and reForge:
mlA/mlB/mlC/mlLoha/mlFull; ``--sdxl``: the Forge tier's SDXL model and mlxA/mlxB/mlxB_te1/mlxB_te2), then runs N
generations with a seeded random draw of: method (off, Switch, Composite), τ, a subset of 0-4 of the LoRAs, batch
size 1-2, hires fix on/off, and an interrupt (POST /sdapi/v1/interrupt from a timer thread after a short random
delay) for some of them.

After each generation:
- forward hooks on the UNet and text encoder are as many as at startup (a pass's hooks never outlive it);
- unless it was interrupted or failed, the probe's whole fingerprint (weight and merged-state checksums, hooks,
  loaded networks) equals the one a plain generation of the same prompt leaves (cached per prompt);
- a plain generation of the same prompt is then run: its fingerprint must equal that cached one and its image must
  be bit-identical to the cached plain image.
A generation failing any of these counts as one leak. Errors: non-2xx answers and tracebacks in the server log
(except the known startup report that ``server.tracebacks`` leaves out). The last line is exactly
``soak: host=H model=M generations=N leaks=L errors=E``; the exit code is 1 when L or E is not 0.

    eval "$(python3 -m tests.hosts setup a1111)"; "$SD_WEBUI_PYTHON" bench/soak.py --generations 200 [--seed 0]
    eval "$(python3 -m tests.hosts setup forge)"; "$SD_FORGE_PYTHON" bench/soak.py --host forge [--sdxl]
    eval "$(python3 -m tests.hosts setup reforge)"; "$SD_REFORGE_PYTHON" bench/soak.py --host reforge [--sdxl]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.hosts.recipes import RECIPES  # noqa: E402
from tests.hosts.ui import build_assets, host_server  # noqa: E402
from tests.webui.server import DEFAULT_TXT2IMG, WebuiClient, WebuiServer, tracebacks  # noqa: E402

TITLE = "Multi-LoRA Composition"
PROMPT = "a photo of a cat"
#: Each tier's five test LoRAs: plain ones, and the types each host runs on its dense path.
LORAS = {
    "a1111": ("mlA", "mlB", "mlC", "mlLocon", "mlLoha"),
    "forge": ("mlA", "mlB", "mlC", "mlLoha", "mlFull"),
    "reforge": ("mlA", "mlB", "mlC", "mlLoha", "mlFull"),
}
#: The Forge tier's SDXL LoRAs (``--sdxl``): two on the UNet and both text encoders, and one text encoder's part each.
SDXL_LORAS = ("mlxA", "mlxB", "mlxB_te1", "mlxB_te2")
METHODS = ("off", "Switch", "Composite")
PLAIN: dict[str, Any] = {**DEFAULT_TXT2IMG, "steps": 6, "seed": 7}
HIRES: dict[str, Any] = {
    "enable_hr": True,
    "hr_scale": 2,
    "hr_second_pass_steps": 3,
    "denoising_strength": 0.5,
    "hr_upscaler": "Latent",
}
#: Forge's API leaves it None, which its hires pass cannot read ("'Use same choices' not in None": HTTP 500).
HIRES_EXTRA: dict[str, dict[str, Any]] = {"forge": {"hr_additional_modules": ["Use same choices"]}}
INTERRUPT_SHARE = 0.2


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass(frozen=True)
class Draw:
    """One random generation."""

    method: str
    tau: int
    loras: tuple[str, ...]
    batch_size: int
    hires: bool
    steps: int
    seed: int
    interrupt_after: float | None

    @property
    def prompt(self) -> str:
        return " ".join([PROMPT, *(f"<lora:{name}:1>" for name in self.loras)])

    def payload(self, hires_extra: dict[str, Any]) -> dict[str, Any]:
        args = [self.method != "off", "Switch" if self.method == "off" else self.method, self.tau, ""]
        return {
            **DEFAULT_TXT2IMG,
            "prompt": self.prompt,
            "steps": self.steps,
            "seed": self.seed,
            "batch_size": self.batch_size,
            **({**HIRES, **hires_extra} if self.hires else {}),
            "alwayson_scripts": {TITLE: {"args": args}},
        }

    def describe(self) -> str:
        parts = [self.method, f"tau={self.tau}", "+".join(self.loras) or "no-lora", f"b{self.batch_size}"]
        if self.hires:
            parts.append("hires")
        if self.interrupt_after is not None:
            parts.append(f"interrupt@{self.interrupt_after:.2f}s")
        return " ".join(parts)


def draw(rng: random.Random, loras: tuple[str, ...]) -> Draw:
    # subsets in a fixed order: the plain-generation cache is per prompt, and order only changes Switch's schedule
    chosen = set(rng.sample(loras, rng.randint(0, 4)))
    return Draw(
        method=rng.choice(METHODS),
        tau=rng.randint(1, 5),
        loras=tuple(name for name in loras if name in chosen),
        batch_size=rng.randint(1, 2),
        hires=rng.random() < 0.25,
        steps=rng.randint(4, 10),
        seed=rng.randint(0, 2**31 - 1),
        interrupt_after=rng.uniform(0.05, 1.0) if rng.random() < INTERRUPT_SHARE else None,
    )


@dataclass(frozen=True)
class Outcome:
    """What went wrong with one generation (messages), and whether its interrupt arrived while it ran."""

    leaks: list[str]
    errors: list[str]
    interrupted: bool


class Soak:
    """The server, its client and the per-prompt plain references."""

    def __init__(self, server: WebuiServer, hires_extra: dict[str, Any]) -> None:
        self.server, self.hires_extra = server, hires_extra
        self.client = WebuiClient(server, timeout=600)
        self.references: dict[str, tuple[dict[str, Any], Any]] = {}
        self.hooks = self.reference(PROMPT)[0]["hooks"]

    def fingerprint(self) -> dict[str, Any]:
        return self.client.get("/multilora-probe/fingerprint")

    def plain(self, prompt: str) -> Any:
        return self.client.txt2img(**{**PLAIN, "prompt": prompt}).image

    def reference(self, prompt: str) -> tuple[dict[str, Any], Any]:
        """The fingerprint a plain generation of ``prompt`` leaves, and its image (made once per prompt)."""
        if prompt not in self.references:
            image = self.plain(prompt)
            self.references[prompt] = (self.fingerprint(), image)
        return self.references[prompt]

    def run(self, d: Draw) -> Outcome:
        """One drawn generation and its checks."""
        import requests

        expected, image = self.reference(d.prompt)
        interrupted = threading.Event()

        def interrupt() -> None:
            requests.post(f"{self.client.base_url}/sdapi/v1/interrupt", timeout=30)
            interrupted.set()

        timer = threading.Timer(d.interrupt_after, interrupt) if d.interrupt_after is not None else None
        leaks: list[str] = []
        errors: list[str] = []
        mark = self.server.log_mark()
        if timer is not None:
            timer.start()
        response = self.client.request("POST", "/sdapi/v1/txt2img", json=d.payload(self.hires_extra))
        landed = interrupted.is_set()
        if timer is not None:
            timer.cancel()
            timer.join()  # an interrupt in flight lands before the checks' own generations start
        if not response.ok:
            errors.append(f"HTTP {response.status_code}: {response.text[:300]}")
        after = self.fingerprint()
        if after["hooks"] != self.hooks:
            leaks.append(f"{after['hooks']} forward hooks left (expected {self.hooks})")
        elif response.ok and not interrupted.is_set() and after != expected:
            leaks.append(f"state differs from a plain generation of the prompt: {diff(after, expected)}")
        next_image = self.plain(d.prompt)
        check = self.fingerprint()
        if check != expected:
            leaks.append(f"the next plain generation leaves another state: {diff(check, expected)}")
        elif (next_image != image).any():
            leaks.append("the next plain image differs from the first plain image of the prompt")
        errors += [t[:600] for t in tracebacks(self.server.log_text(mark))]
        return Outcome(leaks, errors, landed)


def diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    return ", ".join(f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))


def start_server(host: str, work: Path, webui_dir: Path, sdxl: bool) -> WebuiServer:
    """The host's API-only server on the tier's model and LoRAs (``sdxl``: the Forge tier's SDXL ones), built with
    this python, started and ready."""
    ckpt, lora_dir = build_assets(host, webui_dir, sys.executable, work / "models", sdxl=sdxl)
    server = host_server(host, webui_dir, sys.executable, ckpt, lora_dir, work / "data")
    server.start()
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random draws (same seed, same soak)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dir (server log) at the end")
    parser.add_argument("--host", choices=sorted(LORAS), default="a1111", help="run with that host's python")
    parser.add_argument("--sdxl", action="store_true", help="the Forge tier's SDXL model (forge, reforge)")
    args = parser.parse_args(argv)
    if args.sdxl and args.host == "a1111":
        parser.error("--sdxl: the SDXL model is the Forge tier's (--host forge or reforge)")
    recipe = RECIPES[args.host]
    webui_dir = os.environ.get(recipe.dir_var, "").strip()
    if not webui_dir:
        parser.error(f"set {recipe.dir_var} to the checkout (python3 -m tests.hosts setup {args.host})")
    work = Path(tempfile.mkdtemp(prefix="multilora-soak-"))
    log(f"building assets and starting {args.host} in {work}")
    server = start_server(args.host, work, Path(webui_dir), args.sdxl)
    loras = SDXL_LORAS if args.sdxl else LORAS[args.host]
    rng = random.Random(args.seed)
    leaks = errors = interrupts = 0
    try:
        soak = Soak(server, HIRES_EXTRA.get(args.host, {}))
        started = time.monotonic()
        for i in range(1, args.generations + 1):
            d = draw(rng, loras)
            outcome = soak.run(d)
            leaks += bool(outcome.leaks)
            errors += len(outcome.errors)
            interrupts += outcome.interrupted
            status = "ok" if not (outcome.leaks or outcome.errors) else "LEAK" if outcome.leaks else "ERROR"
            landed = " (landed)" if outcome.interrupted else ""
            log(f"{i}/{args.generations} {status} {d.describe()}{landed}")
            for message in outcome.leaks + outcome.errors:
                log(f"    {message}")
        elapsed = time.monotonic() - started
        log(f"{args.generations} generations in {elapsed:.0f} s, {interrupts} interrupted mid-request")
    finally:
        server.stop()
        if args.keep:
            log(f"kept {work} (server log: {server.log_path})")
        else:
            shutil.rmtree(work, ignore_errors=True)
    model = "sdxl" if args.sdxl else "sd1"
    totals = f"generations={args.generations} leaks={leaks} errors={errors}"
    print(f"soak: host={args.host} model={model} {totals}", flush=True)
    return 1 if leaks or errors else 0


if __name__ == "__main__":
    sys.exit(main())
