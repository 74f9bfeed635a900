from __future__ import annotations

from lib_multilora.args import MultiLoraArgs
from lib_multilora.preview import names_for, picks, preview_text, prompt_loras

PROMPT = "a cat <lora:charA:0.8>, <lora:outfitB:1:0.5> <lora:charA:1> <lora:styleC>"


def test_prompt_loras_in_order_once() -> None:
    assert prompt_loras(PROMPT) == ["charA", "outfitB", "styleC"]


def test_switch_preview_lists_step_ranges() -> None:
    text = preview_text(PROMPT, 12, MultiLoraArgs(True, "Switch", 4))
    assert text == "Switch every 4 of 12 steps: charA: 0-3 | outfitB: 4-7 | styleC: 8-11"


def test_composite_preview_and_subset() -> None:
    text = preview_text(PROMPT, 20, MultiLoraArgs(True, "Composite", loras="styleC, charA"))
    assert text == "Composite, every step: mean of charA 0.50 | styleC 0.50 (2 UNet passes per step)."


def test_composite_preview_names_each_lora_with_its_weight_and_what_weight_0_skips() -> None:
    text = preview_text(PROMPT + " <multilora:composite:weights=2,0,2>", 20, MultiLoraArgs())
    assert text == (
        "Composite, every step: weighted mean of charA 0.50 | outfitB 0.00 | styleC 0.50; weight 0 skips outfitB "
        "(2 UNet passes per step)."
    )


def test_a_wrong_weights_field_is_said_before_generating() -> None:
    bad = preview_text(PROMPT, 20, MultiLoraArgs(True, "Composite", weights="1,2"))
    assert bad == (
        "Composite, every step: mean of charA 0.33 | outfitB 0.33 | styleC 0.33 (3 UNet passes per step). "
        "Warning: composite weights '1,2': 2 weight(s) for 3 composed LoRA(s); using equal weights."
    )
    assert "Warning: composite weights '1,x' are not comma-separated numbers" in preview_text(
        PROMPT, 20, MultiLoraArgs(True, "Spatial", weights="1,x")
    )


def test_a_name_to_compose_that_is_not_in_the_prompt_is_said() -> None:
    text = preview_text(PROMPT, 20, MultiLoraArgs(True, "Switch", loras="charA, mlZ"))
    assert text == ("Will fall back to Merge: mlZ is not in the prompt (LoRAs to compose are among its <lora> tags).")
    assert "one LoRA" in preview_text(PROMPT, 20, MultiLoraArgs(True, "Switch", loras="CHARA"))


def test_picks_follow_the_field_and_a_pick_writes_it() -> None:
    assert picks(PROMPT, "styleC, nope, chara") == ["charA", "styleC"], "prompt order and spelling"
    assert picks("a cat", "charA") == []
    assert names_for(PROMPT, ["styleC", "charA"], "") == "charA, styleC"
    assert names_for(PROMPT, ["outfitB"], "charA, aliasX") == "outfitB, aliasX", "a typed name not in the prompt stays"
    assert names_for(PROMPT, [], "charA") == ""


def test_the_preview_shows_the_step_window() -> None:
    composite = preview_text(PROMPT + " <multilora:composite:end=0.4>", 10, MultiLoraArgs())
    assert composite.endswith("(3 UNet passes per step). Steps 0-3 only; merged outside.")
    switch = preview_text(PROMPT, 12, MultiLoraArgs(True, "Switch", 2, start=0.25, end=0.75))
    assert (
        switch == "Switch every 2 of 12 steps: charA: 3-4 | outfitB: 5-6 | styleC: 7-8 Steps 3-8 only; merged outside."
    )
    assert "Empty step window" in preview_text(PROMPT, 12, MultiLoraArgs(True, "Composite", start=0.5, end=0.5))


def test_tags_in_prompt_win_and_problems_show() -> None:
    assert preview_text(PROMPT + " <multilora:switch:6>", 12, MultiLoraArgs()).startswith("Switch every 6 of 12")
    assert preview_text(PROMPT, 12, MultiLoraArgs()).startswith("Off")
    assert "fall back" in preview_text(PROMPT + " <multilora:switch:x>", 12, MultiLoraArgs(True))
    assert preview_text("a cat", 12, MultiLoraArgs(True)).startswith("No <lora>")


def test_the_preview_names_loras_as_the_prompt_writes_them_whatever_their_items() -> None:
    """LoRA Block Weight's items (block weights with commas, start/stop) leave the names as written."""
    prompt = "a cat <lora:alpha:0.5:lbw=1,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1,1:start=2> <lora:beta:0.5:lbw=OUTALL>"
    text = preview_text(prompt, 8, MultiLoraArgs(True, "Switch", 4))
    assert text == "Switch every 4 of 8 steps: alpha: 0-3 | beta: 4-7"
