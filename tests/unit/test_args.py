from __future__ import annotations

import pytest

from lib_multilora.args import ArgsError, MultiLoraArgs, field_names


def test_defaults_are_off_switch_every_5() -> None:
    a = MultiLoraArgs()
    assert (a.enabled, a.method, a.tau, a.loras) == (False, "Switch", 5, "")
    assert a.problems() == []


def test_positional_args_follow_field_order() -> None:
    assert field_names()[:5] == ["enabled", "method", "tau", "loras", "execution"]
    a = MultiLoraArgs.from_script_args((True, "Composite", 3, "A, B"))
    assert a == MultiLoraArgs(True, "Composite", 3, "A, B")
    assert a.lora_names == ["A", "B"] and a.execution == "Sequential"
    assert MultiLoraArgs.from_script_args((True, "Composite", 3, "", "batched")).execution == "Batched"


def test_loras_as_the_panel_picks_them_are_the_same_comma_list() -> None:
    assert MultiLoraArgs.from_script_args((True, "Switch", 5, ["A", " B "])).loras == "A, B"
    assert MultiLoraArgs.from_script_args((True, "Switch", 5, [])).loras == ""
    assert MultiLoraArgs.from_dict({"loras": ("A",)}) == MultiLoraArgs(loras="A")
    with pytest.raises(ArgsError, match="list of strings"):
        MultiLoraArgs.from_dict({"loras": ["A", 3]})


def test_dict_args_and_case_insensitive_method() -> None:
    a = MultiLoraArgs.from_script_args(({"enabled": True, "method": "composite"},))
    assert a.method == "Composite" and a.enabled and a.tau == 5


@pytest.mark.parametrize(
    "args",
    [
        ({"enabled": True, "bogus": 1},),
        (True, "Switch", "abc"),
        (True, "Switch", 2.5),
        (True, 3),
        ("yes",),
        (True, "Switch", 5, "", "extra", "more", "args", "too", "many"),
    ],
)
def test_bad_script_args_raise_clear_errors(args: tuple) -> None:
    with pytest.raises(ArgsError):
        MultiLoraArgs.from_script_args(args)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (MultiLoraArgs(True, "Blend", 5), "unknown method"),
        (MultiLoraArgs(True, "Switch", 0), "positive"),
        (MultiLoraArgs(True, "Switch", -3), "positive"),
        (MultiLoraArgs(True, "Composite", execution="Parallel"), "unknown execution 'Parallel'"),
    ],
)
def test_problems_name_what_is_wrong(args: MultiLoraArgs, fragment: str) -> None:
    assert any(fragment in p for p in args.problems())


def test_infotext_round_trip() -> None:
    for a in (MultiLoraArgs(True, "Switch", 7, "A, B"), MultiLoraArgs(True, "Composite", 5, "A, B, C")):
        info = a.infotext(a.lora_names)
        # infotext values come back as strings after the webui parses them
        back = MultiLoraArgs.from_infotext({k: str(v) for k, v in info.items()})
        assert back == a
    assert MultiLoraArgs.from_infotext({"Steps": "20"}) == MultiLoraArgs()


def test_composite_infotext_has_no_tau() -> None:
    info = MultiLoraArgs(True, "Composite", 5).infotext(["A", "B"])
    assert info == {"Multi-LoRA method": "Composite", "Multi-LoRA LoRAs": "A, B"}


@pytest.mark.parametrize("execution", ["Batched", "Auto"])
def test_execution_is_in_the_infotext_for_composite_only_when_not_default(execution: str) -> None:
    composite = MultiLoraArgs(True, "Composite", loras="A, B", execution=execution)
    info = composite.infotext(composite.lora_names)
    assert info["Multi-LoRA composite execution"] == execution
    assert MultiLoraArgs.from_infotext({k: str(v) for k, v in info.items()}) == composite
    assert "Multi-LoRA composite execution" not in MultiLoraArgs(True, "Switch", execution=execution).infotext(["A"])
    assert "Multi-LoRA composite execution" not in MultiLoraArgs(True, "Composite").infotext(["A"])


def test_composite_weights_are_in_the_infotext_and_read_back() -> None:
    composite = MultiLoraArgs(True, "Composite", loras="A, B", weights="2,1")
    info = composite.infotext(composite.lora_names)
    assert info["Multi-LoRA composite weights"] == "2,1"
    assert MultiLoraArgs.from_infotext({k: str(v) for k, v in info.items()}) == composite
    assert "Multi-LoRA composite weights" not in MultiLoraArgs(True, "Switch", weights="2,1").infotext(["A", "B"])


def test_the_step_window_round_trips_and_is_checked() -> None:
    windowed = MultiLoraArgs(True, "Composite", loras="A", start=0.2, end=0.8)
    info = windowed.infotext(windowed.lora_names)
    assert (info["Multi-LoRA start"], info["Multi-LoRA end"]) == (0.2, 0.8)
    assert MultiLoraArgs.from_infotext({k: str(v) for k, v in info.items()}) == windowed
    assert "Multi-LoRA start" not in MultiLoraArgs(True, "Composite").infotext([]), "the default is not written"
    assert MultiLoraArgs.from_script_args(({"enabled": True, "end": "0.5"},)).window == (0.0, 0.5)
    assert MultiLoraArgs(True, end=-1.0).problems() == ["step window end must be a number >= 0, got -1.0"]
    with pytest.raises(ArgsError):
        MultiLoraArgs.from_script_args(({"enabled": True, "start": "soon"},))
