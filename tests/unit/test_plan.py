from __future__ import annotations

import pytest

from lib_multilora.plan import composite_weights, select


def net(name: str, *aliases: str) -> tuple[str, frozenset[str]]:
    return name, frozenset({name, *aliases})


def test_empty_request_composes_every_lora_in_prompt_order() -> None:
    s = select([net("A"), net("B"), net("C")], [])
    assert (s.composed, s.warnings, s.error) == ([0, 1, 2], [], None)


def test_request_subset_by_name_or_alias_case_insensitive() -> None:
    s = select([net("A", "charA_v2"), net("B"), net("C")], ["chara_V2", "c"])
    assert s.composed == [0, 2] and s.error is None


def test_missing_requested_name_is_an_error_and_composes_nothing() -> None:
    s = select([net("A"), net("B")], ["A", "Z"])
    assert s.composed == [] and "Z" in s.error


def test_zero_loras_is_an_error() -> None:
    assert "no <lora" in select([], []).error


def test_one_lora_runs_with_a_warning() -> None:
    s = select([net("A"), net("B")], ["B"])
    assert s.composed == [1] and s.error is None and "only one LoRA" in s.warnings[0]


def test_same_lora_twice_is_composed_once_at_the_weight_merge_gives_it() -> None:
    s = select([net("B"), net("A"), net("A")], [])
    assert (s.composed, s.counts, s.warnings) == ([0, 1], [1, 2], [])


def test_counts_follow_the_requested_subset() -> None:
    s = select([net("A"), net("B"), net("A"), net("A")], ["a"])
    assert (s.composed, s.counts) == ([0], [3])


def test_one_lora_loaded_twice_is_one_lora() -> None:
    s = select([net("A"), net("A")], [])
    assert (s.composed, s.counts) == ([0], [2]) and "only one LoRA (A)" in s.warnings[0]


def test_composite_weights_normalise_and_equal_ones_are_the_plain_mean() -> None:
    assert composite_weights("2,1,1", 3) == ([0.5, 0.25, 0.25], None)
    assert composite_weights(" 1, 0 ", 2) == ([1.0, 0.0], None)
    assert composite_weights("", 3) == (None, None)
    assert composite_weights("3,3,3", 3) == (None, None), "equal weights: the mean as computed without weights"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("2,1", "2 weight(s) for 3 composed LoRA(s)"),
        ("1,-1,1", "each must be a finite number >= 0"),
        ("1,nan,1", "each must be a finite number >= 0"),
        ("0,0,0", "all zero"),
        ("a,b,c", "not comma-separated numbers"),
    ],
)
def test_bad_composite_weights_name_the_problem_and_fall_back_to_equal(text: str, problem: str) -> None:
    weights, message = composite_weights(text, 3)
    assert weights is None and problem in message and message.endswith("using equal weights")
