"""How a host attaches to a processing object (``generation.adopt``, ``begin``), on a plain Python stand-in:
wrappers that run the host's cleanup, then the method they replace, and a ``copy(p)`` that gets wrappers of its own
instead of cleaning up the original. Shown against the real webui's X/Y/Z cells (copies of one p) in tests/webui."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest

from lib_multilora import generation


class Processing:
    """Has what the hosts wrap (``close``, txt2img's ``calculate_hr_conds``), recording whom they ran on."""

    def __init__(self, log: list[tuple[str, int]]) -> None:
        self.log = log

    def close(self) -> None:
        self.log.append(("close", id(self)))

    def calculate_hr_conds(self) -> None:
        self.log.append(("hr_conds", id(self)))


def test_wrappers_run_before_the_method_once_per_adopt() -> None:
    ran: list[int] = []
    wrappers = {"close": lambda p: ran.append(id(p)), "calculate_hr_conds": lambda p: ran.append(-id(p))}
    log: list[tuple[str, int]] = []
    p = Processing(log)
    generation.adopt(p, wrappers)
    generation.adopt(p, wrappers)  # a second generation on the same p (Loopback) does not wrap twice
    p.close()
    p.calculate_hr_conds()
    assert log == [("close", id(p)), ("hr_conds", id(p))]
    assert ran == [id(p), -id(p)]


def test_a_copy_of_an_adopted_p_cleans_up_itself_not_the_original() -> None:
    ran: list[int] = []
    wrappers = {"close": lambda p: ran.append(id(p))}
    log: list[tuple[str, int]] = []
    p = Processing(log)
    generation.adopt(p, wrappers)
    p.multilora_pass = object()  # the original's pass state, copied along by copy(p)
    q = copy.copy(p)
    generation.adopt(q, wrappers)
    assert "multilora_pass" not in vars(q) and "multilora_pass" in vars(p)
    q.close()
    assert log == [("close", id(q))] and ran == [id(q)]
    p.close()
    assert log[-1] == ("close", id(p)) and ran[-1] == id(p)


def test_a_wrapper_still_calls_the_method_when_cleanup_raises() -> None:
    def broken(p: object) -> None:
        raise RuntimeError("cleanup failed")

    log: list[tuple[str, int]] = []
    p = Processing(log)
    generation.adopt(p, {"close": broken})
    with pytest.raises(RuntimeError, match="cleanup failed"):
        p.close()
    assert log == [("close", id(p))]


def test_unwrap_restores_the_method_and_ignores_other_wrappers() -> None:
    log: list[tuple[str, int]] = []
    p = Processing(log)
    generation.wrap_method(p, "close", lambda p: None)
    q = copy.copy(p)
    generation.unwrap_method(q, "close")  # q's close is p's wrapper: not q's to undo
    assert "close" in vars(q)
    generation.unwrap_method(p, "close")
    assert "close" not in vars(p)


class RecordingHost:
    """A :class:`generation.Host` that records the calls ``p.close`` makes."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def resolve(self, p: object) -> None:
        return None

    def apply_text_encoder_policy(self, p: object) -> None:
        self.calls.append("policy")

    def restore_text_encoder(self, p: object) -> None:
        self.calls.append("restore")

    def start_pass(self, p: object) -> None:
        self.calls.append("start")

    def finish_pass(self, p: object) -> None:
        self.calls.append("finish")


class Generation(Processing):
    """Enough of a txt2img processing object for ``begin``."""

    def __init__(self, log: list[tuple[str, int]]) -> None:
        super().__init__(log)
        self.extra_generation_params = {"Multi-LoRA method": "Switch", "Steps": 8}
        self.comments: list[str] = []

    def comment(self, text: str) -> None:
        self.comments.append(text)


def test_begin_wraps_close_drops_stale_infotext_and_reads_the_args() -> None:
    host = RecordingHost()
    p = Generation([])
    generation.begin(p, ({"enabled": True, "method": "Composite"},), host)
    assert host.calls == ["finish"], "a pass left over on this p is ended first"
    assert p.extra_generation_params == {"Steps": 8}, "an earlier X/Y/Z cell's keys are gone"
    assert (p.multilora_args.enabled, p.multilora_args.method) == (True, "Composite")
    p.close()
    assert host.calls == ["finish", "finish", "restore"] and p.log == [("close", id(p))]
    p.calculate_hr_conds()
    assert host.calls[-1] == "policy", "the hires conds get the text-encoder policy"


def test_bad_args_warn_once_in_the_infotext() -> None:
    p = Generation([])
    generation.begin(p, ({"enabled": True, "bogus": 1},), RecordingHost())
    generation.warn(p, p.multilora_warnings[0])
    assert p.multilora_args.enabled is False
    assert p.extra_generation_params[generation.WARNING_LABEL].count("bogus") == 1 and len(p.comments) == 1


def test_loras_are_named_as_the_prompt_writes_them_whatever_another_extension_renamed_them_to() -> None:
    """LoRA Block Weight renames A1111's loaded LoRA ``alpha`` to ``alpha_in_LBW_0.123`` (a random suffix per
    generation): the composed set, its warnings and the ``LoRAs to compose`` field use ``alpha``."""
    p = Generation([])
    generation.begin(p, ({"enabled": True, "method": "Composite", "loras": "alpha"},), RecordingHost())
    disk = SimpleNamespace(name="alpha", alias="alpha")
    renamed = SimpleNamespace(name="alpha_in_LBW_0.123", mentioned_name="alpha", network_on_disk=disk)
    resolved = generation.resolve(p, [renamed])
    assert resolved is not None and resolved.composed == [renamed]
    assert generation.prompt_name(renamed) == "alpha"
    assert "only one LoRA (alpha)" in p.extra_generation_params[generation.WARNING_LABEL]
