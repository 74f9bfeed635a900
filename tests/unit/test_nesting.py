"""A pass nested in a generation (ADetailer's detail pass) on plain stand-ins: it finds its generation through the
infotext params it was made with, runs as that generation's X/Y/Z cell, tells it its warnings, and a nested pass made
without Multi-LoRA is said in the generation's infotext. Shown with the real ADetailer in every host tier
(tests/webui/test_adetailer.py, tests/forge/test_adetailer.py)."""

from __future__ import annotations

import copy
from typing import Any

from test_generation import Generation, RecordingHost, lora

from lib_multilora import generation, nesting

WARNING = generation.WARNING_LABEL


def outer_generation(host: RecordingHost, **args: Any) -> Generation:
    p = Generation([])
    generation.begin(p, ({"enabled": True, "method": "Composite", **args},), host)
    p.extra_generation_params[generation.label_of("method")] = "Composite"  # as install writes it
    return p


def detail_pass(outer: Generation) -> Generation:
    """An img2img p as ADetailer makes it: a copy of the generation's params without callables, its marker."""
    p = Generation([])
    p.extra_generation_params = {k: v for k, v in outer.extra_generation_params.items() if not callable(v)}
    p._ad_inner = True
    return p


def test_the_link_is_left_out_of_the_infotext_and_found_through_a_copy_of_the_params() -> None:
    outer = outer_generation(RecordingHost())
    visible = [f"{k}: {v}" for k, v in outer.extra_generation_params.items() if v is not None]  # the webui's rule
    assert not any(nesting.LINK_TEXT in entry for entry in visible)
    inner = detail_pass(outer)
    assert nesting.enclosing(inner) is outer
    assert nesting.enclosing(outer) is None, "a generation is not nested in itself"
    generation.end(outer, RecordingHost())
    assert nesting.LINK_TEXT not in outer.extra_generation_params, "gone once the generation is over"


def test_a_nested_pass_runs_as_its_generations_xyz_cell_and_tells_it_its_warnings() -> None:
    host = RecordingHost([lora("alpha"), lora("beta")])
    outer = outer_generation(host)
    outer.multilora_override = {"method": "Switch", "tau": 3}  # its X/Y/Z cell
    inner = detail_pass(outer)
    generation.begin(inner, ({"enabled": True, "method": "Composite"},), host)
    assert (inner.multilora_args.method, inner.multilora_args.tau) == ("Switch", 3)
    generation.warn(inner, "the face says hi")
    assert "ADetailer's detail pass: the face says hi" in outer.extra_generation_params[WARNING]
    assert "the face says hi" in inner.extra_generation_params[WARNING]


def test_a_merge_cell_turns_the_nested_pass_off_too() -> None:
    host = RecordingHost([lora("alpha"), lora("beta")])
    outer = outer_generation(host)
    outer.multilora_override, outer.multilora_cell_is_merge = {"enabled": False}, True
    inner = detail_pass(outer)
    generation.begin(inner, ({"enabled": True, "method": "Composite"},), host)
    assert generation.effective_args(inner) is None


def test_a_nested_pass_without_multilora_is_said_where_the_generation_runs_a_method() -> None:
    outer = outer_generation(RecordingHost())
    generation.note_nested_pass(detail_pass(outer))
    said = outer.extra_generation_params[WARNING]
    assert "ADetailer's detail pass ran with every LoRA merged" in said and "names multilora" in said
    merged = outer_generation(RecordingHost())
    merged.extra_generation_params[generation.label_of("method")] = "Merge"  # an X/Y/Z Merge cell
    generation.note_nested_pass(detail_pass(merged))
    assert WARNING not in merged.extra_generation_params, "a Merge image's face pass is Merge too"


def test_a_nested_pass_multilora_runs_in_says_nothing_of_its_own_absence() -> None:
    host = RecordingHost([lora("alpha"), lora("beta")])
    outer = outer_generation(host)
    inner = detail_pass(outer)
    generation.begin(inner, ({"enabled": True, "method": "Composite"},), host)
    generation.note_nested_pass(inner)
    generation.note_nested_pass(outer)  # the generation's own activations
    assert WARNING not in outer.extra_generation_params


def test_a_copy_of_the_generation_is_no_nested_pass_and_its_end_keeps_the_link() -> None:
    """ADetailer calls every script's ``postprocess`` and ``process`` on ``copy(p)``, before and after its passes."""
    host = RecordingHost([lora("alpha")])
    outer = outer_generation(host)
    clone = copy.copy(outer)
    generation.end(clone, host)
    assert nesting.enclosing(detail_pass(outer)) is outer, "the copy shares the params: the link must stay"
    generation.begin(clone, ({"enabled": True, "method": "Composite"},), host)
    assert "multilora_enclosing" not in vars(clone)
    generation.note_nested_pass(clone)
    assert WARNING not in outer.extra_generation_params
