from __future__ import annotations

import pytest

from lib_multilora.args import MultiLoraArgs
from lib_multilora.tags import apply_tags, strip_malformed

BASE = MultiLoraArgs()


@pytest.mark.parametrize(
    ("items", "expected"),
    [
        (["switch"], MultiLoraArgs(True, "Switch", 5)),
        (["switch", "3"], MultiLoraArgs(True, "Switch", 3)),
        (["Switch", "tau=2"], MultiLoraArgs(True, "Switch", 2)),
        (["composite"], MultiLoraArgs(True, "Composite", 5)),
        (["composite", "loras=A,B"], MultiLoraArgs(True, "Composite", 5, "A,B")),
        (["composite", "weights=2,1,1"], MultiLoraArgs(True, "Composite", 5, weights="2,1,1")),
        (["composite", "end=0.4"], MultiLoraArgs(True, "Composite", 5, end=0.4)),
        (["switch", "3", "start=0.2", "end=0.8"], MultiLoraArgs(True, "Switch", 3, start=0.2, end=0.8)),
    ],
)
def test_valid_tags(items: list[str], expected: MultiLoraArgs) -> None:
    assert apply_tags(BASE, [items]) == (expected, [])


def test_tags_win_over_panel_and_later_tags_win() -> None:
    panel = MultiLoraArgs(True, "Composite", 9, "X")
    args, warnings = apply_tags(panel, [["switch"], ["switch", "4"]])
    assert args == MultiLoraArgs(True, "Switch", 4, "X") and warnings == []
    assert apply_tags(panel, [["off"]])[0].enabled is False


@pytest.mark.parametrize(
    "items",
    [
        [""],
        ["switch", "abc"],
        ["switch", "0"],
        ["switch", "-2"],
        ["blend"],
        ["composite", "3"],
        ["switch", "1", "2"],
        ["switch", "foo=1"],
        ["off", "1"],
        ["switch", "1.5"],
        ["switch", "weights=1,2"],
        ["composite", "end=soon"],
        ["composite", "start=-1"],
    ],
)
def test_malformed_tags_warn_and_leave_args_unchanged(items: list[str]) -> None:
    panel = MultiLoraArgs(True, "Composite", 5)
    args, warnings = apply_tags(panel, [items])
    assert args == panel
    assert len(warnings) == 1 and warnings[0].startswith("ignored <multilora:")


@pytest.mark.parametrize(
    ("prompt", "expected", "n_warnings"),
    [
        ("a cat <multilora:switch:5>", "a cat <multilora:switch:5>", 0),
        ("a cat <multilora:> x", "a cat  x", 1),
        ("a cat <multilora> x", "a cat  x", 1),
        ("a cat <multilora:switch <lora:A:1>", "a cat <lora:A:1>", 1),
        ("<MultiLora:> <multilora:composite>", " <multilora:composite>", 1),
        ("a cat <lora:A:1>", "a cat <lora:A:1>", 0),
    ],
)
def test_strip_malformed(prompt: str, expected: str, n_warnings: int) -> None:
    out, warnings = strip_malformed(prompt)
    assert out == expected and len(warnings) == n_warnings
