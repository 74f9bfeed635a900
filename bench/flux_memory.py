"""Peak server memory of Composite against Merge in a real Forge on a full-width Flux: what a diffusers-format LoRA
(q, k and v as slices of Flux's fused projections: Forge's offset patches) costs the pass, against a kohya one (1:1).

Builds the Forge tier's tiny Flux (``tests/forge/tiny_dit.py``: FLUX.1-dev's layout, full-size VAE and text-encoder
widths) at FLUX.1's full width, hidden 3072 and 24 heads of 128, with one double and one single block (~0.55 B
transformer parameters, 1.1 GB in the fp16 file; Forge keeps them fp32 on the CPU: the server holds ~4.7 GB), and its
LoRAs (rank 4: ``mfdA``/``mfdB`` diffusers-format, ``mfA``/``mfB`` kohya); starts the tier's Forge on it (its probe
carries the tier's one test-only patch, Flux's dimensions read from the file). Per layout, a block of requests with
that layout's two LoRAs in the prompt (the LoRA set, and so Forge's merged weights, fixed within the block): one
warm-up of each case (the first merge of each kind adds ~90 MB for good), then ``--rounds`` rounds in a rotating order
of Merge and Composite, 64x64, 4 Euler steps on the Simple schedule at CFG 1 with distilled guidance 3.5, as Flux-dev
runs. Per request the kernel's peak RSS of the server (VmHWM, reset through /proc/PID/clear_refs before it: a sampler
misses Forge's merge spikes) and its CPU seconds; medians. Target: Composite within Merge + 64 MB. The last line is
one JSON object.

    eval "$(python3 -m tests.hosts setup forge)"; "$SD_FORGE_PYTHON" bench/flux_memory.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT / "tests"), str(REPO_ROOT)]  # the tiers import each other as top-level packages

from forge.server import HERE as FORGE_TESTS  # noqa: E402
from forge.server import ForgeServer  # noqa: E402
from webui.server import WebuiClient, server_env  # noqa: E402

#: FLUX.1's width and heads (rotary dims summing to its head width 128), one block of each kind.
FULL_WIDTH = {"hidden_size": 3072, "num_heads": 24, "axes_dim": [16, 56, 56], "depth": 1, "depth_single_blocks": 1}
PROMPT = "a photo of a cat"
LAYOUTS = {"diffusers": ("mfdA", "mfdB"), "kohya": ("mfA", "mfB")}
FLUX = {"steps": 4, "scheduler": "Simple", "cfg_scale": 1, "distilled_cfg_scale": 3.5, "width": 64, "height": 64}
COMPOSITE = {"Multi-LoRA Composition": {"args": [{"enabled": True, "method": "Composite"}]}}
TARGET_MB = 64


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build(forge_dir: Path, out: Path) -> dict:
    """``tiny_dit.build`` at full width, with the host's python (it imports Forge's classes)."""
    code = (
        "import sys\nfrom pathlib import Path\n"
        f"sys.path.insert(0, {str(FORGE_TESTS)!r})\n"
        "import tiny_dit\n"
        f"tiny_dit.FLUX_CONFIG.update({FULL_WIDTH!r})\n"
        f"tiny_dit.build(Path({str(out)!r}), Path({str(forge_dir)!r}))\n"
    )
    with open(out.parent / "build.log", "wb") as fh:
        done = subprocess.run([sys.executable, "-c", code], cwd=forge_dir, env=server_env(), stdout=fh, stderr=fh)
    if done.returncode:
        raise RuntimeError(f"building the Flux model failed:\n{(out.parent / 'build.log').read_text()[-3000:]}")
    return json.loads((out / "manifest.json").read_text())


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def request(client: WebuiClient, pid: int, prompt: str, composite: bool) -> dict[str, float]:
    """One generation: the server's peak RSS during it (VmHWM reset first), its RSS before, its CPU seconds."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before, cpu = status_kb(pid, "VmRSS"), cpu_seconds(pid)
    result = client.txt2img(prompt=prompt, seed=1234, **FLUX, **({"alwayson_scripts": COMPOSITE} if composite else {}))
    if composite != ("Multi-LoRA method: Composite" in result.infotext) or "Multi-LoRA warning" in result.infotext:
        raise RuntimeError(f"unexpected infotext: {result.infotext}")
    peak = status_kb(pid, "VmHWM")
    return {"peak_mb": peak / 1024, "before_mb": before / 1024, "cpu_s": cpu_seconds(pid) - cpu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="build into (and reuse) this folder instead of a temporary one")
    args = parser.parse_args(argv)
    forge_dir = Path(os.environ.get("SD_FORGE_DIR", "").strip() or parser.error("set SD_FORGE_DIR (tests.hosts setup)"))
    root = args.keep or Path(tempfile.mkdtemp(prefix="multilora-flux-memory-"))
    models = root / "models"
    if (models / "manifest.json").exists():
        manifest = json.loads((models / "manifest.json").read_text())
    else:
        log(f"building the full-width Flux into {models}")
        models.mkdir(parents=True, exist_ok=True)
        manifest = build(forge_dir, models)
    ckpt = Path(manifest["checkpoints"]["tiny-flux-dev"])
    server = ForgeServer(forge_dir, root / "data", ckpt, Path(manifest["lora_dir"]), host="forge")
    log("starting Forge on it")
    server.start()
    samples: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        server.wait_ready()
        client = WebuiClient(server, timeout=3600)
        client.post("/multilora-probe/recompute", {"enabled": False})
        pid = server.proc.pid
        for layout, (a, b) in LAYOUTS.items():
            prompt = f"{PROMPT} <lora:{a}:0.5> <lora:{b}:0.5>"
            cases = [("merge", False), ("composite", True)]
            for _, composite in cases:  # warm-up: the set's merge, the first Composite pass
                request(client, pid, prompt, composite)
            for r in range(args.rounds):
                for name, composite in cases[r % 2 :] + cases[: r % 2]:
                    sample = request(client, pid, prompt, composite)
                    samples.setdefault((layout, name), []).append(sample)
                    log(f"{layout} {name}: peak {sample['peak_mb']:.0f} MB, cpu {sample['cpu_s']:.1f} s")
    except BaseException:
        print(server.log_tail(3000), file=sys.stderr)
        raise
    finally:
        server.stop()
    out: dict[str, dict[str, float]] = {}
    for layout in LAYOUTS:
        merge, composite = samples[(layout, "merge")], samples[(layout, "composite")]

        def median(rows: list[dict[str, float]], key: str) -> float:
            return statistics.median(row[key] for row in rows)

        out[layout] = {
            "merge_peak_mb": median(merge, "peak_mb"),
            "composite_peak_mb": median(composite, "peak_mb"),
            "composite_minus_merge_mb": median(composite, "peak_mb") - median(merge, "peak_mb"),
            "merge_cpu_s": median(merge, "cpu_s"),
            "composite_cpu_s": median(composite, "cpu_s"),
        }
        print(
            f"{layout}: Merge peak {out[layout]['merge_peak_mb']:.0f} MB, Composite "
            f"{out[layout]['composite_peak_mb']:.0f} MB ({out[layout]['composite_minus_merge_mb']:+.0f} MB; "
            f"target <= +{TARGET_MB}), CPU {out[layout]['merge_cpu_s']:.1f} s vs {out[layout]['composite_cpu_s']:.1f} s"
        )
    ok = all(v["composite_minus_merge_mb"] <= TARGET_MB for v in out.values())
    print(json.dumps({"model": "Flux, hidden 3072, 24 heads, 1+1 blocks", "rounds": args.rounds, "ok": ok, **out}))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
