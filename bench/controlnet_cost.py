"""What Composite costs beside Forge's built-in ControlNet: server CPU seconds per sampling step (the difference of a
21-step and a 1-step request, so model loading and the VAE cancel out) for Merge and Composite over two LoRAs, with
and without a ControlNet unit, on the Forge tier's tiny model and a random ControlNet built for it
(tests/forge/tiny_controlnet.py). Cases interleaved, rotated per round, medians of ``--rounds``.

Forge computes the control once per model call, before the method's wrapper, and every pass of a Composite step
reuses it (its weights carry no LoRA): so a unit adds one ControlNet run per step, not one per pass, and the ratio
Composite/Merge falls with a unit on.

    eval "$(python3 -m tests.hosts setup forge)"; "$SD_FORGE_PYTHON" bench/controlnet_cost.py [--rounds 3]
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

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT / "tests"), str(REPO_ROOT)]  # the tiers import each other as top-level packages

from forge.server import ForgeServer, build_assets  # noqa: E402
from webui.server import WebuiClient, encode_image, server_env  # noqa: E402

PROMPT = "a photo of a cat <lora:mlA:0.5> <lora:mlB:0.5>"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc; clock ticks of 1/100 s)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    forge = Path(os.environ.get("SD_FORGE_DIR", "").strip() or parser.error("set SD_FORGE_DIR (tests.hosts setup)"))
    import numpy as np

    root = Path(tempfile.mkdtemp(prefix="multilora-cn-cost-"))
    manifest = build_assets(forge, root / "models")
    data = root / "data"
    builder = [sys.executable, str(REPO_ROOT / "tests" / "forge" / "tiny_controlnet.py")]
    subprocess.run(
        [*builder, str(data / "models" / "ControlNet"), "--forge", str(forge)],
        cwd=forge,
        env=server_env(),
        check=True,
        capture_output=True,
    )
    server = ForgeServer(forge, data, Path(manifest["ckpt"]), Path(manifest["lora_dir"]))
    server.start()
    try:
        server.wait_ready()
        client = WebuiClient(server, timeout=900)
        client.post("/multilora-probe/recompute", {"enabled": False})  # the trace's recompute runs the UNet too
        model = next(m for m in client.get("/controlnet/model_list")["model_list"] if m.startswith("tiny-cn"))
        hint = encode_image(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
        unit = {"ControlNet": {"args": [{"enabled": True, "module": "None", "model": model, "image": hint}]}}
        composite = {"Multi-LoRA Composition": {"args": [{"enabled": True, "method": "Composite"}]}}
        cases = {"merge": {}, "composite": composite, "merge+cn": unit, "composite+cn": {**unit, **composite}}
        samples: dict[tuple[str, int], list[float]] = {}
        names = list(cases)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                for steps in (1, 21):
                    before = cpu_seconds(server.proc.pid)
                    client.txt2img(prompt=PROMPT, steps=steps, alwayson_scripts=cases[name])
                    samples.setdefault((name, steps), []).append(cpu_seconds(server.proc.pid) - before)
        per_step = {
            name: (statistics.median(samples[(name, 21)]) - statistics.median(samples[(name, 1)])) / 20
            for name in cases
        }
        print(
            json.dumps(
                {
                    "per_step_cpu_s": per_step,
                    "composite_over_merge": per_step["composite"] / per_step["merge"],
                    "composite_over_merge_with_unit": per_step["composite+cn"] / per_step["merge+cn"],
                },
                indent=2,
            )
        )
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
