"""bench/unet_engine.py at its smallest: every case equals its merged-weight reference on real diffusers UNets (an
SD1-like and an SDXL-like one) and Flux transformers (q/k/v separate, and fused with the LoRAs on spans of the fused
layers, as Forge stores Flux), the JSON line has what the README quotes, and a wrong path makes the run fail.
Timings are not checked: they are the benchmark's business, not a test's."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("diffusers")

from lib_multilora import engine

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "unet_engine.py"
CHECKS = {"switch", "composite_seq", "batched_stacked", "batched_unstacked", "batched_vs_seq", "window", "spatial"}
CASES = {"merge", "switch", "composite_seq", "batched_stacked", "batched_unstacked", "window", "spatial"}
RATIOS = {
    "switch_over_merge",
    "composite_seq_over_n_merge",
    "batched_over_seq",
    "batched_over_merge",
    "stacked_over_unstacked",
    "window_over_merge",
    "spatial_over_n1_merge",
}


def load_bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The script as a module (registered while the test runs: its dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location("unet_engine", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


#: The cases of a model whose latent is no image (Flux's packed tokens): no window, no Spatial.
TOKEN_CASES = CASES - {"window", "spatial"}
MODELS = ("tiny", "tiny-xl", "tiny-flux", "tiny-flux-fused")


def test_tiny_run_equals_references() -> None:
    argv = [sys.executable, str(SCRIPT), "--model", ",".join(MODELS), "--n", "2,3", "--repeats", "1"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True
    assert summary.keys() >= {"device", "dtype", "rank", "timer", "memory", "results"}
    assert summary["dtype"] == "fp32"
    assert [(r["model"], r["n"]) for r in summary["results"]] == [(m, n) for m in MODELS for n in (2, 3)]
    for result in summary["results"]:
        flux = result["model"].startswith("tiny-flux")
        cases, ratios = (
            (TOKEN_CASES, RATIOS - {"window_over_merge", "spatial_over_n1_merge"}) if flux else (CASES, RATIOS)
        )
        assert result["ok"] is True
        assert result["tolerance"] == 1e-4
        assert result["max_rel_err"].keys() == CHECKS & (cases | {"batched_vs_seq"})
        assert all(err <= 1e-4 for err in result["max_rel_err"].values()), result
        assert result["separation"] > 5e-4, "LoRAs too weak: a wrong path would pass too"
        assert result["median_ms"].keys() == result["peak_extra_mib"].keys() == result["engine_mib"].keys() == cases
        assert result.keys() >= ratios
        assert all(result[key] > 0 for key in ratios)
        assert {f"{case}_peak_over_merge_plus_factors" for case in cases - {"merge"}} <= result.keys()
        assert result["sliced_layers"] == (3 if result["model"] == "tiny-flux-fused" else 0)
        assert result["rows"] == (1 if flux else 2)


def test_a_wrong_path_fails_the_run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Hooks that add each LoRA on top of weights that already hold them all: fast, and wrong, so the run fails."""
    bench = load_bench(monkeypatch)

    def wrong_engine(deltas: dict, n: int, keep_merged: bool, stack: bool, base: bool = False) -> object:
        return engine.build_engine(deltas, n, keep_merged=False, stack=stack, base=base)

    monkeypatch.setattr(bench, "build_engine", wrong_engine)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--device", "cpu", "--model", "tiny", "--n", "2", "--repeats", "0"]) == 1
    finally:
        torch.set_num_threads(threads)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"][0]
    assert result["ok"] is False
    assert result["max_rel_err"]["switch"] > 1e-2
    assert "median_ms" not in result  # a failed check is never timed


def test_the_extension_never_imports_diffusers() -> None:
    """diffusers is a benchmark dependency only: the webui does not ship it."""
    for path in sorted([*(ROOT / "lib_multilora").glob("*.py"), *(ROOT / "scripts").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(name.split(".")[0] == "diffusers" for name in names), path
