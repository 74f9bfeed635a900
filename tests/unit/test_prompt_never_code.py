"""Prompt text is data, never code: tags, the LoRA list and infotext are read with regex and str operations only.

Two guards: no module of the extension (lib_multilora/, scripts/) calls an evaluating builtin at all, and hostile
tags are parsed (and rejected with a warning) while those builtins are booby-trapped.
"""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest

from lib_multilora.args import MultiLoraArgs
from lib_multilora.tags import apply_tags, strip_malformed

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(ROOT / "lib_multilora").glob("*.py"), *(ROOT / "scripts").glob("*.py")])
#: Called by bare name (``re.compile`` is fine) / as an attribute (``ast.literal_eval``, ``builtins.eval``).
EVALUATING_BUILTINS = {"eval", "exec", "compile", "__import__"}
EVALUATING_ATTRIBUTES = {"eval", "exec", "literal_eval", "import_module"}
HOSTILE = "__import__('os').system('touch pwned')"


def _evaluates(call: ast.Call) -> bool:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id in EVALUATING_BUILTINS
    return isinstance(func, ast.Attribute) and func.attr in EVALUATING_ATTRIBUTES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_module_calls_an_evaluating_builtin(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = [ast.unparse(node) for node in ast.walk(tree) if isinstance(node, ast.Call) and _evaluates(node)]
    assert found == []


@pytest.fixture
def trapped_builtins(monkeypatch: pytest.MonkeyPatch) -> None:
    def trap(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("prompt text reached an evaluating builtin")

    for name in ("eval", "exec", "compile"):
        monkeypatch.setattr(builtins, name, trap)


@pytest.mark.usefixtures("trapped_builtins")
@pytest.mark.parametrize(
    "items",
    [["switch", HOSTILE], ["switch", f"tau={HOSTILE}"], [HOSTILE], ["composite", f"loras={HOSTILE}", "x=1"]],
)
def test_hostile_tag_items_are_rejected_as_text(items: list[str]) -> None:
    panel = MultiLoraArgs(True, "Composite", 5)
    args, warnings = apply_tags(panel, [items])
    assert args == panel and len(warnings) == 1 and HOSTILE in warnings[0]


@pytest.mark.usefixtures("trapped_builtins")
def test_hostile_lora_list_is_only_a_name() -> None:
    args, warnings = apply_tags(MultiLoraArgs(), [["composite", f"loras={HOSTILE}"]])
    assert warnings == [] and args.lora_names == [HOSTILE]  # a name matched against loaded LoRAs, nothing more


@pytest.mark.usefixtures("trapped_builtins")
def test_hostile_malformed_fragment_is_removed() -> None:
    prompt, warnings = strip_malformed(f"a cat <multilora:{HOSTILE}")
    assert prompt == "a cat " and len(warnings) == 1
