"""End-to-end cost of Multi-LoRA in a real webui: Merge vs Switch vs Composite (sequential, batched, and with the
step window ``end=0.4``) vs Spatial Composite, and the extension enabled with nothing to compose vs absent.

Starts two API-only webui servers on the CPU (the test tiers' servers, ``--host a1111|forge|reforge``): one with this
extension, one without (the "absent" reference). On A1111, an SD1.5-size random model with rank-16 LoRAs (built once
into the cache dir; ~2 GB; ``--quick``: the A1111 tier's tiny one); on Forge and reForge the same from the Forge
tier's builder with the host's own classes (tests/forge/tiny_model.py ``--sd15``; ``--quick``: the tier's tiny model
and rank-4 LoRAs), the tier's trace probe installed with its recomputes off (its per-call observer reads the
patcher's patch sets: microseconds). Cases
run in blocks that keep the prompt's LoRA set fixed (N=2, N=3, then the no-LoRA idle block, so that no case pays for
the webui re-merging another set; the absent server's warm-up is a LoRA generation too, so that both processes hold the
built-in's weight backups), interleaved with a rotating order, repeated, all with the same seed. Reported
per case: medians of wall time, of server CPU time (the webui runs one compute thread, so CPU time is the work done,
hardly affected by other load on a shared machine) and of peak server RSS (VmHWM, reset before each request).
Ratios come from the CPU-time medians (wall-time ones alongside). The last line is one JSON object.

    SD_WEBUI_DIR=/path/to/webui /path/to/webui/venv/bin/python bench/compare.py [--quick] [--repeats 3]
    eval "$(python3 -m tests.hosts setup forge)"; "$SD_FORGE_PYTHON" bench/compare.py --host forge
    eval "$(python3 -m tests.hosts setup reforge)"; "$SD_REFORGE_PYTHON" bench/compare.py --host reforge
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))  # as tests.hosts.ui puts it: the tiers import as top-level packages

from forge.server import build_assets as build_forge_assets  # noqa: E402
from forge.tiny_model import RANK as TINY_RANK  # noqa: E402
from forge.tiny_model import SD15_RANK  # noqa: E402

from tests.hosts.recipes import RECIPES  # noqa: E402
from tests.hosts.ui import host_server  # noqa: E402
from tests.webui.server import PROBE_EXTENSION, PROBE_LINK_NAME, WebuiClient, WebuiServer  # noqa: E402

TITLE = "Multi-LoRA Composition"
PROMPT = "a photo of a cat"
LORAS = ("mlA", "mlB", "mlC")
SEED = 1234
WINDOW_END = 0.4  # the windowed Composite case: Composite for the first 40% of the steps, merged after
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_CACHE = Path.home() / ".cache" / "sd-webui-multilora" / "bench"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------------------------------
# assets
# --------------------------------------------------------------------------------------------------------------------


def build_assets(cache: Path, quick: bool, rank: int, webui_dir: Path) -> tuple[Path, Path, str]:
    """The checkpoint and LoRA dir, built once per (model, rank) into ``cache``; returns (ckpt, lora_dir, name)."""
    from tests.webui.tiny_lora import build_loras
    from tests.webui.tiny_model import SD15_NAME, TINY_NAME, build_sd15_random, build_tiny_sd1

    name, build = (TINY_NAME, build_tiny_sd1) if quick else (SD15_NAME, build_sd15_random)
    model_dir = cache / name
    ckpt = model_dir / f"{name}.safetensors"
    done = model_dir / "complete"
    if not done.exists():
        log(f"building {name} into {model_dir} (once)")
        build(model_dir, seed=0, webui_dir=webui_dir)
        done.touch()
    lora_dir = model_dir / f"lora-rank{rank}"
    lora_done = lora_dir / "complete"
    if not lora_done.exists():
        log(f"building rank-{rank} LoRAs into {lora_dir} (once)")
        build_loras(lora_dir, ckpt, seed=0, webui_dir=webui_dir, rank=rank)
        lora_done.touch()
    return ckpt, lora_dir, name


def forge_assets(cache: Path, host: str, quick: bool, webui_dir: Path) -> tuple[Path, Path, str]:
    """The Forge tier builder's SD1.5-size model and rank-16 LoRAs (``quick``: the tier's tiny model and rank-4
    LoRAs) for ``host``, built once into ``cache``."""
    name = f"{host} tier's tiny-sd15" if quick else f"{host} builder's SD1.5-size random model"
    folder = cache / (f"{host}-tiny" if quick else f"{host}-sd15")
    manifest = folder / "manifest.json"
    if not manifest.exists():
        log(f"building {name} into {folder} (once)")
        build_forge_assets(webui_dir, folder, python=sys.executable, sd15=not quick)
    paths = json.loads(manifest.read_text())
    return Path(paths["ckpt"]), Path(paths["lora_dir"]), name


def start_servers(host: str, webui_dir: Path, ckpt: Path, lora_dir: Path, tmp: Path) -> dict[str, WebuiServer]:
    """The main server (with the extension) and the absent one, not started yet."""
    if host == "a1111":
        return {
            kind: BenchServer(webui_dir=webui_dir, data_dir=tmp / kind, ckpt=ckpt, lora_dir=lora_dir,
                              with_extension=kind == "main")
            for kind in ("main", "absent")
        }  # fmt: skip
    return {
        kind: host_server(host, webui_dir, sys.executable, ckpt, lora_dir, tmp / kind, with_extension=kind == "main")
        for kind in ("main", "absent")
    }


class BenchServer(WebuiServer):
    """The test tier's server with only the status probe (``wait_ready`` polls it): the trace probes' observers
    re-run the UNet to check every Composite call, which would be timed too."""

    def prepare_data_dir(self) -> None:
        scripts = self.data_dir / "bench-probe" / "scripts"
        scripts.mkdir(parents=True, exist_ok=True)
        (scripts / "multilora_probe.py").symlink_to(PROBE_EXTENSION / "scripts" / "multilora_probe.py")
        (self.data_dir / "extensions").mkdir(parents=True, exist_ok=True)
        (self.data_dir / "extensions" / PROBE_LINK_NAME).symlink_to(scripts.parent, target_is_directory=True)
        super().prepare_data_dir()  # links the extension (main server) and writes the settings; keeps our probe


# --------------------------------------------------------------------------------------------------------------------
# measuring one request
# --------------------------------------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM of a process, in kB."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of every thread of a process so far."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14 and 15 of proc(5))


def reset_peak(pid: int) -> None:
    """Reset VmHWM to the current RSS (proc(5): writing 5 to clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as fh:
        fh.write("5")


@dataclass
class Sample:
    wall: float
    cpu: float
    peak_mb: float
    rss_before_mb: float


@dataclass
class Case:
    """One generation setting: which server, prompt and script args, and what its infotext must show."""

    name: str
    server: str  # "main" | "absent"
    prompt: str
    script: dict[str, Any] | None
    expect: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()
    warmup_prompt: str | None = None  # the prompt of the 1-step warm-up call, if not ``prompt``
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)


def multilora(**args: Any) -> dict[str, Any]:
    """Named script args (the dict form the extension reads): independent of the panel's component order."""
    return {TITLE: {"args": [{"enabled": True, **args}]}}


def run(
    case: Case, servers: dict[str, WebuiServer], clients: dict[str, WebuiClient], payload: dict[str, Any]
) -> Sample:
    server, client = servers[case.server], clients[case.server]
    pid = server.proc.pid
    body = {"prompt": case.prompt, **payload}  # a warm-up call may bring its own prompt
    if case.script is not None:
        body["alwayson_scripts"] = case.script
    reset_peak(pid)
    before = proc_status(pid)["VmRSS"]
    cpu0, wall0 = cpu_seconds(pid), time.perf_counter()
    result = client.txt2img(**body)
    wall, cpu = time.perf_counter() - wall0, cpu_seconds(pid) - cpu0
    peak = proc_status(pid)["VmHWM"]
    for text in case.expect:
        if text not in result.infotext:
            raise RuntimeError(f"{case.name}: {text!r} not in infotext {result.infotext!r}")
    for text in case.forbid:
        if text in result.infotext:
            raise RuntimeError(f"{case.name}: {text!r} in infotext {result.infotext!r}")
    return Sample(wall, cpu, peak / 1024, before / 1024)


def blocks(n_values: list[int], tau: int) -> list[list[Case]]:
    """The cases, in blocks within which the prompt's LoRA set (and so the webui's merged weights) stays the same."""
    out = []
    prompts = {n: f"{PROMPT} " + " ".join(f"<lora:{name}:0.8>" for name in LORAS[:n]) for n in n_values}
    for n, prompt in prompts.items():
        out.append(
            [
                Case(f"merge_n{n}", "main", prompt, None, forbid=("Multi-LoRA",)),
                Case(
                    f"switch_n{n}", "main", prompt, multilora(method="Switch", tau=tau), ("Multi-LoRA method: Switch",)
                ),
                Case(
                    f"composite_seq_n{n}",
                    "main",
                    prompt,
                    multilora(method="Composite", execution="Sequential"),
                    ("Multi-LoRA method: Composite",),
                    ("composite execution", "Multi-LoRA warning"),
                ),
                Case(
                    f"composite_batched_n{n}",
                    "main",
                    prompt,
                    multilora(method="Composite", execution="Batched"),
                    ("Multi-LoRA composite execution: Batched",),
                    ("Multi-LoRA warning",),
                ),
                Case(
                    f"composite_end{WINDOW_END}_n{n}",
                    "main",
                    prompt,
                    multilora(method="Composite", end=WINDOW_END),
                    (f"Multi-LoRA end: {WINDOW_END}",),
                    ("Multi-LoRA warning",),
                ),
                Case(
                    f"spatial_n{n}",
                    "main",
                    prompt,
                    multilora(method="Spatial"),
                    ("Multi-LoRA method: Spatial",),
                    ("Multi-LoRA warning",),
                ),
            ]
        )
    out.append(
        [
            Case("idle", "main", PROMPT, multilora(method="Composite"), ("no <lora",), ("Multi-LoRA method",)),
            # one LoRA generation first, as the other server had: both then hold the built-in's weight backups
            Case("absent", "absent", PROMPT, None, forbid=("Multi-LoRA",), warmup_prompt=prompts[max(n_values)]),
        ]
    )
    return out


def measure(
    all_blocks: list[list[Case]],
    servers: dict[str, WebuiServer],
    clients: dict[str, WebuiClient],
    payload: dict[str, Any],
    repeats: int,
) -> None:
    """Per block: one 1-step warm-up call per case (loads and merges the LoRAs), then ``repeats`` rounds with the
    case order rotated each round."""
    for block in all_blocks:
        log(f"block {', '.join(c.name for c in block)}: warm-up (1 step each), then {repeats} rounds")
        for case in block:
            run(case, servers, clients, {**payload, "steps": 1, "prompt": case.warmup_prompt or case.prompt})
        for r in range(repeats):
            for case in block[r % len(block) :] + block[: r % len(block)]:
                sample = run(case, servers, clients, payload)
                case.samples.append(sample)
                log(f"  {case.name}: wall {sample.wall:.2f} s, cpu {sample.cpu:.2f} s, peak {sample.peak_mb:.0f} MB")


# --------------------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------------------


def ratios(by_name: dict[str, Case], n_values: list[int], attr: str) -> dict[str, Any]:
    """The headline ratios (worst over N) and per-N ones, from the medians of ``attr``."""
    per_n = {}
    for n in n_values:
        merge, switch = by_name[f"merge_n{n}"], by_name[f"switch_n{n}"]
        seq, batched = by_name[f"composite_seq_n{n}"], by_name[f"composite_batched_n{n}"]
        per_n[str(n)] = {
            "switch_over_merge": switch.median(attr) / merge.median(attr),
            "composite_seq_over_n_merge": seq.median(attr) / (n * merge.median(attr)),
            "composite_batched_over_seq": batched.median(attr) / seq.median(attr),
            # expected 1 + WINDOW_END * (N - 1) Merges, and N + 1 for Spatial
            "composite_window_over_merge": by_name[f"composite_end{WINDOW_END}_n{n}"].median(attr) / merge.median(attr),
            "spatial_over_n1_merge": by_name[f"spatial_n{n}"].median(attr) / ((n + 1) * merge.median(attr)),
            "composite_peak_mem_over_merge": seq.median("peak_mb") / merge.median("peak_mb"),
            "composite_batched_peak_mem_over_merge": batched.median("peak_mb") / merge.median("peak_mb"),
        }
    worst = {key: max(r[key] for r in per_n.values()) for key in next(iter(per_n.values()))}
    idle = by_name["idle"].median(attr) / by_name["absent"].median(attr)
    return {**worst, "idle_over_absent": idle, "by_n": per_n}


def print_table(cases: list[Case]) -> None:
    print(f"{'case':<24}{'wall s':>9}{'cpu s':>9}{'peak RSS MB':>13}{'peak-before MB':>16}  samples (cpu s)")
    for case in cases:
        cpu = ", ".join(f"{s.cpu:.2f}" for s in case.samples)
        delta = statistics.median(s.peak_mb - s.rss_before_mb for s in case.samples)
        print(
            f"{case.name:<24}{case.median('wall'):>9.2f}{case.median('cpu'):>9.2f}{case.median('peak_mb'):>13.0f}"
            f"{delta:>16.0f}  {cpu}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", choices=sorted(RECIPES), default="a1111", help="run with that host's python")
    parser.add_argument("--quick", action="store_true", help="tiny model and 2 repeats: a smoke run")
    parser.add_argument("--repeats", type=int, default=None, help="measured rounds per block (default 3; quick 2)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--tau", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--n", type=int, nargs="+", default=[2, 3], choices=[2, 3], help="LoRAs composed")
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_CACHE, help=f"asset cache (default {DEFAULT_CACHE})")
    parser.add_argument("--start-timeout", type=float, default=1200.0)
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 3)
    recipe = RECIPES[args.host]
    if not os.environ.get(recipe.dir_var, "").strip():
        parser.error(f"set {recipe.dir_var} (python3 -m tests.hosts setup {args.host}) and run with the host's python")
    webui_dir = Path(os.environ[recipe.dir_var].strip())
    if args.host == "a1111":
        ckpt, lora_dir, model = build_assets(args.model_dir, args.quick, args.rank, webui_dir)
    else:
        ckpt, lora_dir, model = forge_assets(args.model_dir, args.host, args.quick, webui_dir)
        args.rank = TINY_RANK if args.quick else SD15_RANK  # the builder's LoRAs
    payload = {"width": args.size, "height": args.size, "steps": args.steps, "seed": SEED, "cfg_scale": 7}
    all_blocks = blocks(args.n, args.tau)
    with tempfile.TemporaryDirectory(prefix="multilora-bench-") as tmp:
        servers = start_servers(args.host, webui_dir, ckpt, lora_dir, Path(tmp))
        clients: dict[str, WebuiClient] = {}
        try:
            for kind, server in servers.items():  # one at a time: loading is the memory peak
                log(f"starting the {kind} {args.host} on {model}")
                server.start()
                server.wait_ready(timeout=args.start_timeout)
                clients[kind] = WebuiClient(server, timeout=3600)
                if args.host != "a1111":  # the Forge tier's trace probe re-runs every Composite call otherwise
                    clients[kind].post("/multilora-probe/recompute", {"enabled": False})
            measure(all_blocks, servers, clients, payload, repeats)
        except BaseException:
            for kind, server in servers.items():
                print(f"--- {kind} webui log tail ---\n{server.log_tail(3000)}", file=sys.stderr)
            raise
        finally:
            for client in clients.values():
                client.close()
            for server in servers.values():
                server.stop()

    cases = [case for block in all_blocks for case in block]
    by_name = {case.name: case for case in cases}
    print()
    print(
        f"{args.host}, {model}, {args.size}x{args.size}, {args.steps} steps Euler, rank {args.rank}, tau {args.tau}, "
        f"CPU, {repeats} rounds (medians)"
    )
    print_table(cases)
    cpu_ratios, wall_ratios = ratios(by_name, args.n, "cpu"), ratios(by_name, args.n, "wall")
    print()
    for key, value in cpu_ratios.items():
        if key != "by_n":
            print(f"{key:<40}{value:>8.3f} (cpu)  {wall_ratios[key]:>8.3f} (wall)")
    summary = {
        "host": args.host,
        "device": "cpu",
        "model": model,
        "steps": args.steps,
        "size": args.size,
        "n_loras": args.n,
        "rank": args.rank,
        "repeats": repeats,
        "timing": "median server CPU time; ratios worst over n_loras",
        **cpu_ratios,
        "wall": wall_ratios,
        "medians": {
            c.name: {"wall": c.median("wall"), "cpu": c.median("cpu"), "peak_mb": c.median("peak_mb")} for c in cases
        },
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
