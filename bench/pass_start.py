"""How long a pass takes to start: the extension's pass start (``generation.start_pass``: resolve the LoRAs, refuse
or plan the deltas, build the hooks, install) and its text-encoder policy (``apply_text_encoder_policy``, before the
conds), timed inside a real host by its test probe (``/multilora-probe/pass-start-times``: the CPU time of the
thread that runs them, so other load hardly moves it), for Composite over three LoRAs with the text encoder seeing
only the first (so both run; ``--text-encoder All``: the policy has nothing to do, and the pass start gives no text
encoder back), one step, medians of ``--generations``.

``--extension DIR`` times another checkout of this repository (an earlier commit, for a before/after): the probe
times whatever ``lib_multilora.generation`` the host loaded.

    eval "$(python3 -m tests.hosts setup reforge)"
    "$SD_REFORGE_PYTHON" bench/pass_start.py --host reforge [--generations 20] [--extension ../before]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.hosts.recipes import RECIPES  # noqa: E402
from tests.hosts.ui import build_assets, host_server  # noqa: E402
from tests.webui.server import WebuiClient  # noqa: E402

PROMPT = "a photo of a cat <lora:mlA:0.5> <lora:mlB:0.5> <lora:mlC:0.5>"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", choices=tuple(RECIPES), default="a1111")
    parser.add_argument("--generations", type=int, default=20)
    parser.add_argument("--extension", type=Path, default=REPO_ROOT)
    parser.add_argument("--text-encoder", choices=("All", "First", "None"), default="First")
    args = parser.parse_args(argv)
    recipe = RECIPES[args.host]
    webui_dir = Path(
        os.environ.get(recipe.dir_var, "").strip() or sys.exit(f"set {recipe.dir_var} (tests.hosts setup)")
    )
    python = os.environ.get(recipe.python_var, "").strip() or sys.executable
    folder = Path(tempfile.mkdtemp(prefix="multilora-pass-start-"))
    try:
        ckpt, lora_dir = build_assets(args.host, webui_dir, python, folder / "models")
        server = host_server(args.host, webui_dir, python, ckpt, lora_dir, folder / "data", extension=args.extension)
        server.start()
        try:
            server.wait_ready()
            client = WebuiClient(server, timeout=600)
            client.post("/multilora-probe/recompute", {"enabled": False})
            named = {"enabled": True, "method": "Composite", "text_encoder": args.text_encoder}
            body = {"prompt": PROMPT, "steps": 1, "alwayson_scripts": {"Multi-LoRA Composition": {"args": [named]}}}
            client.txt2img(**body)  # loads the LoRAs
            client.post("/multilora-probe/pass-start-times")
            for _ in range(args.generations):
                client.txt2img(**body)
            times = client.get("/multilora-probe/pass-start-times")
        finally:
            server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report = {
        "host": args.host,
        "extension": str(args.extension),
        "text_encoder": args.text_encoder,
        "generations": args.generations,
        **{f"{name}_ms": 1000 * statistics.median(times[name]) for name in times if times[name]},
        "calls": {name: len(values) for name, values in times.items()},
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
