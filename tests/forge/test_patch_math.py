"""The pass's deltas against the host's own merge (``merge_lora_to_weight`` on Forge, ``calculate_weight`` on reForge),
on the patch entries the host's loader and patcher make of Flux LoRAs in both layouts (``patch_math.py``, run by the
host's python, no server: a few seconds). Diffusers-format slices of the fused ``qkv``/``linear1`` (offset entries)
and ``swap_scale_shift`` stay low rank at the size of their factors; kohya, alpha-less and conv LoRAs are plain low
rank; ``strength_model`` and DoRA run through the merge's dense delta; every one equals the merged layer, and on a
layer holding several plain LoRAs merged each one's complement runs it alone."""

from __future__ import annotations

import json
import subprocess

import pytest

from .server import HERE, HOST, SKIP_REASON, forge_dir_from_env, forge_python

if forge_dir_from_env() is None:
    pytest.skip(SKIP_REASON, allow_module_level=True)

#: Relative to the layer output's largest value: float32 rounding, where a wrong span or scale is of order 1.
TOL = 1e-5


@pytest.fixture(scope="module")
def records() -> list[dict]:
    done = subprocess.run(
        [forge_python(), str(HERE / "patch_math.py"), HOST, str(forge_dir_from_env())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def by_file(records: list[dict], key: str) -> dict[str, dict]:
    return {r["file"]: r for r in records if r["key"] == f"diffusion_model.{key}.weight" and "delta" in r}


def test_every_delta_equals_the_hosts_merge(records: list[dict]) -> None:
    deltas = [r for r in records if "delta" in r]
    assert len(deltas) == 13, [(r["key"], r["file"]) for r in deltas]
    assert [(r["key"], r["file"]) for r in deltas if r["diff"] > TOL] == []


@pytest.mark.parametrize(
    ("key", "spans"),
    [
        ("double_blocks.0.img_attn.qkv", [[0, 8], [8, 16], [16, 24]]),
        ("double_blocks.0.txt_attn.qkv", [[0, 8], [8, 16], [16, 24]]),
        ("single_blocks.0.linear1", [[0, 8], [8, 16], [16, 24], [24, 56]]),
    ],
)
def test_diffusers_slices_of_fused_weights_stay_low_rank(records: list[dict], key: str, spans: list) -> None:
    record = by_file(records, key)["diffusers"]
    assert record["offsets"] == [[0, span[0], span[1] - span[0]] for span in spans]
    assert record["delta"] == "LowRankParts" and record["spans"] == spans
    assert record["stored"] == sum(4 * 8 + 4 * (b - a) for a, b in spans)  # rank 4, width 8: the factors only


def test_each_kind_of_entry_takes_its_path(records: list[dict]) -> None:
    final = by_file(records, "final_layer.adaLN_modulation.1")
    assert final["diffusers"]["functions"] == ["swap_scale_shift"] and final["diffusers"]["delta"] == "LowRankDelta"
    assert final["kohya"]["delta"] == "LowRankDelta"
    assert by_file(records, "conv")["conv"]["delta"] == "LowRankDelta"
    assert by_file(records, "double_blocks.0.img_attn.qkv")["strength_model"]["delta"] == "DenseDelta"
    assert by_file(records, "single_blocks.0.linear2")["dora"]["delta"] == "DenseDelta"
    assert by_file(records, "double_blocks.0.img_attn.proj")["diffusers"]["delta"] == "LowRankDelta"


def test_complements_on_merged_fused_layers_run_each_lora_alone(records: list[dict]) -> None:
    complements = [r for r in records if "complement_of" in r]
    layers = {r["key"].split(".", 1)[1].rsplit(".", 1)[0] for r in complements}
    assert layers == {"double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "final_layer.adaLN_modulation.1"}
    assert len(complements) == 6 and [r["file"] for r in complements if r["diff"] > TOL] == []
