"""What Composite costs beside a ControlNet unit, on A1111 (Mikubill's sd-webui-controlnet) and on Forge (its
built-in): server CPU seconds per sampling step (the difference of a 21-step and a 1-step request, so model loading
and the VAE cancel out) for Merge and Composite over two LoRAs, with and without one unit, on the host tier's tiny
model and a random ControlNet built for it. Cases interleaved, rotated per round, medians of ``--rounds``.

A ControlNet sees no LoRA, so every pass of a Composite step may share one control: Forge computes it once per model
call, before the method's wrapper; on A1111 the extension computes it inside each UNet forward, and the passes of a
call reuse the first one's (``lib_multilora.reuse``; the case ``composite+cn (computed per pass)`` turns that off).
Composite with a unit should then cost about what N UNet passes and one ControlNet run cost: the JSON's ``target``
is 1.05 x (N·UNet + CN) / (UNet + CN) of Merge with the unit, from the measured UNet (Merge) and CN (Merge with the
unit less Merge) per step.

    eval "$(python3 -m tests.hosts setup a1111)"; "$SD_WEBUI_PYTHON" bench/controlnet_cost.py --host a1111
    eval "$(python3 -m tests.hosts setup forge)"; "$SD_FORGE_PYTHON" bench/controlnet_cost.py --host forge
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT / "tests"), str(REPO_ROOT)]  # the tiers import each other as top-level packages

from webui.server import WebuiClient, WebuiServer, encode_image, server_env  # noqa: E402

PROMPT = "a photo of a cat <lora:mlA:0.5> <lora:mlB:0.5>"
N = 2
COMPOSITE = {"Multi-LoRA Composition": {"args": [{"enabled": True, "method": "Composite"}]}}
#: The setting that turns the A1111 reuse off (lib_multilora/ui.py).
REUSE = "multilora_controlnet_reuse"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; clock ticks of 1/100 s)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def forge_server(root: Path) -> tuple[WebuiServer, str, str]:
    """A Forge on the Forge tier's tiny model and LoRAs, with a random ControlNet in its models folder (written
    before it starts: Forge lists them once); the unit's preprocessor name for "none"."""
    from forge.server import ForgeServer, build_assets

    forge = Path(os.environ.get("SD_FORGE_DIR", "").strip() or sys.exit("set SD_FORGE_DIR (tests.hosts setup forge)"))
    manifest = build_assets(forge, root / "models")
    data = root / "data"
    builder = [sys.executable, str(REPO_ROOT / "tests" / "forge" / "tiny_controlnet.py")]
    command = [*builder, str(data / "models" / "ControlNet"), "--forge", str(forge)]
    subprocess.run(command, cwd=forge, env=server_env(), check=True, capture_output=True)
    return ForgeServer(forge, data, Path(manifest["ckpt"]), Path(manifest["lora_dir"])), "tiny-cn", "None"


def a1111_server(root: Path) -> tuple[WebuiServer, str, str]:
    """An A1111 on its tier's tiny model and LoRAs with Mikubill's ControlNet linked in; the random ControlNet is
    written by the tier's probe once it runs (:func:`a1111_controlnet`)."""
    from webui.tiny_lora import build_loras
    from webui.tiny_model import build_tiny_sd1

    webui = Path(os.environ.get("SD_WEBUI_DIR", "").strip() or sys.exit("set SD_WEBUI_DIR (tests.hosts setup a1111)"))
    neighbours = Path(os.environ.get("SD_WEBUI_NEIGHBOURS", "").strip() or sys.exit("set SD_WEBUI_NEIGHBOURS"))
    ckpt = build_tiny_sd1(root / "models" / "Stable-diffusion", seed=0, webui_dir=webui)
    build_loras(root / "models" / "Lora", ckpt, seed=0, webui_dir=webui)
    server = WebuiServer(webui_dir=webui, data_dir=root / "data", ckpt=ckpt, lora_dir=root / "models" / "Lora")
    server.prepare_data_dir()
    (server.data_dir / "extensions" / "sd-webui-controlnet").symlink_to(neighbours / "sd-webui-controlnet")
    return server, "mlControl", "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", choices=("a1111", "forge"), default="forge")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="image width and height (the hint is 64x64, resized)")
    args = parser.parse_args(argv)
    import numpy as np

    root = Path(tempfile.mkdtemp(prefix="multilora-cn-cost-"))
    server, name, none = (a1111_server if args.host == "a1111" else forge_server)(root)
    server.start()
    try:
        server.wait_ready()
        client = WebuiClient(server, timeout=900)
        client.post("/multilora-probe/recompute", {"enabled": False})  # the trace's recompute runs the UNet too
        if args.host == "a1111":  # the tier's random ControlNet for its tiny model, as tests/webui/test_neighbours.py
            client.post("/multilora-probe/controlnet-model", {"name": name, "seed": 0, "scale": 0.3})
        model = next(m for m in client.get("/controlnet/model_list")["model_list"] if m.startswith(name))
        hint = encode_image(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        unit = {"ControlNet": {"args": [{"enabled": True, "module": none, "model": model, "image": hint}]}}
        cases: dict[str, tuple[dict[str, Any], bool]] = {
            "merge": ({}, True),
            "composite": (COMPOSITE, True),
            "merge+cn": (unit, True),
            "composite+cn": ({**unit, **COMPOSITE}, True),
        }
        if args.host == "a1111":
            cases["composite+cn (computed per pass)"] = ({**unit, **COMPOSITE}, False)
        samples: dict[tuple[str, int], list[float]] = {}
        names = list(cases)
        for r in range(args.rounds):
            for case in names[r % len(names) :] + names[: r % len(names)]:
                scripts, reuse = cases[case]
                if args.host == "a1111":
                    client.post("/sdapi/v1/options", {REUSE: reuse})
                for steps in (1, 21):
                    before = cpu_seconds(server.proc.pid)
                    size = {"width": args.size, "height": args.size}
                    client.txt2img(prompt=PROMPT, steps=steps, alwayson_scripts=scripts, **size)
                    samples.setdefault((case, steps), []).append(cpu_seconds(server.proc.pid) - before)
        per_step = {
            case: (statistics.median(samples[(case, 21)]) - statistics.median(samples[(case, 1)])) / 20
            for case in cases
        }
        unet, cn = per_step["merge"], per_step["merge+cn"] - per_step["merge"]
        report = {
            "host": args.host,
            "size": args.size,
            "per_step_cpu_s": per_step,
            "composite_over_merge": per_step["composite"] / unet,
            "composite_over_merge_with_unit": per_step["composite+cn"] / per_step["merge+cn"],
            "target_with_unit": 1.05 * (N * unet + cn) / (unet + cn),
        }
        if args.host == "a1111":
            report["computed_per_pass_over_merge_with_unit"] = (
                per_step["composite+cn (computed per pass)"] / per_step["merge+cn"]
            )
        print(json.dumps(report, indent=2))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
