"""Which other extensions a pass refuses to run beside, or runs sequentially beside, read from a stand-in of the
webui's processing object: their script instances, their args and the batch's ``<lora>`` tags. Shown against the
real extensions in tests/webui/test_neighbours.py and tests/forge/test_lbw.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from lib_multilora import neighbours


class Script:
    """An always-on script as the webui's runner holds it: a title and the slice of ``p.script_args`` it owns."""

    def __init__(self, title: str, args_from: int, args_to: int, **state: Any) -> None:
        self._title, self.args_from, self.args_to = title, args_from, args_to
        vars(self).update(state)

    def title(self) -> str:
        return self._title


def tag(*items: str) -> SimpleNamespace:
    """One ``<lora:...>`` of the batch as ``extra_networks.parse_prompts`` gives it (``items``: split on ``:``)."""
    return SimpleNamespace(items=list(items))


def processing(scripts: list[Script], script_args: list[Any], *tags: SimpleNamespace) -> SimpleNamespace:
    return SimpleNamespace(
        scripts=SimpleNamespace(alwayson_scripts=scripts),
        script_args=script_args,
        extra_network_data={"lora": list(tags)},
    )


LBW_ON = Script(neighbours.LBW, 2, 4)


def test_lbw_step_controls_are_refused_while_lbw_runs() -> None:
    stepped = tag("mlA", "0.5", "lbw=OUTALL", "start=3")
    p = processing([LBW_ON], [True, "Switch", "presets", True], tag("mlB", "0.5"), stepped, tag("mlC", "1", "step=2-5"))
    assert neighbours.lbw_stepped(p) == ["mlA", "mlC"]
    reason = neighbours.refusal(p, "Composite")
    assert reason is not None and reason.startswith("LoRA Block Weight's start/stop/step on mlA, mlC")


def test_lbw_block_weights_alone_or_lbw_off_are_not_refused() -> None:
    weighted = processing([LBW_ON], [True, "Switch", "presets", True], tag("mlA", "0.5", "lbw=1,0,1"))
    assert neighbours.refusal(weighted, "Switch") is None
    off = processing([LBW_ON], [True, "Switch", "presets", False], tag("mlA", "0.5", "stop=4"))
    assert not neighbours.lbw_active(off) and neighbours.refusal(off, "Switch") is None
    absent = processing([], [], tag("mlA", "0.5", "stop=4"))
    assert neighbours.refusal(absent, "Switch") is None, "without LBW the items mean nothing"


def test_lbw_left_out_of_a_short_api_args_list_counts_as_on() -> None:
    p = processing([Script(neighbours.LBW, 1, 1)], [True], tag("mlA", "stop=4"))
    assert neighbours.lbw_active(p)


def rp(**state: Any) -> Script:
    return Script(neighbours.RP, 0, 0, **state)


def test_regional_prompter_latent_mode_is_refused_attention_mode_splits_the_batch() -> None:
    latent = processing([rp(active=True, calc="Latent", mode="Horizontal")], [], tag("mlA"))
    assert "Regional Prompter's latent mode" in (neighbours.refusal(latent, "Switch") or "")
    attention = processing([rp(active=True, calc="Attention", mode="Horizontal")], [], tag("mlA"))
    assert neighbours.refusal(attention, "Composite") is None
    assert "Regional Prompter's attention mode" in (neighbours.splits_batch(attention) or "")
    idle = processing([rp(active=False, calc="Latent", mode="Horizontal")], [], tag("mlA"))
    assert neighbours.refusal(idle, "Composite") is None and neighbours.splits_batch(idle) is None


def test_regional_prompter_prompt_mode_is_refused_for_the_mixing_methods_only() -> None:
    p = processing([rp(active=True, calc="Attention", mode="Prompt-Ex")], [], tag("mlA"))
    assert neighbours.refusal(p, "Switch") is None
    for method in ("Composite", "Spatial"):
        assert "prompt mode" in (neighbours.refusal(p, method) or "")
