"""How the host glue attaches to a processing object, on a plain Python stand-in: wrappers that run our cleanup, then
the method they replace, and a ``copy(p)`` that gets wrappers of its own instead of cleaning up the original.
(The host module imports the webui only inside the functions that need it.)"""

from __future__ import annotations

import copy

import pytest

from lib_multilora import host


class Processing:
    """Has what ``adopt`` wraps: ``close`` and ``calculate_hr_conds`` (txt2img's), recording who they ran on."""

    def __init__(self, log: list[tuple[str, int]]) -> None:
        self.log = log

    def close(self) -> None:
        self.log.append(("close", id(self)))

    def calculate_hr_conds(self) -> None:
        self.log.append(("hr_conds", id(self)))


def test_close_runs_cleanup_then_the_original_close_once_per_adopt(monkeypatch: pytest.MonkeyPatch) -> None:
    cleaned: list[int] = []
    monkeypatch.setattr(host, "close_generation", lambda p: cleaned.append(id(p)))
    monkeypatch.setattr(host, "before_hires_conds", lambda p: cleaned.append(-id(p)))
    log: list[tuple[str, int]] = []
    p = Processing(log)
    host.adopt(p)
    host.adopt(p)  # a second generation on the same p (Loopback) does not wrap twice
    p.close()
    p.calculate_hr_conds()
    assert log == [("close", id(p)), ("hr_conds", id(p))]
    assert cleaned == [id(p), -id(p)]


def test_a_copy_of_an_adopted_p_cleans_up_itself_not_the_original(monkeypatch: pytest.MonkeyPatch) -> None:
    cleaned: list[int] = []
    monkeypatch.setattr(host, "close_generation", lambda p: cleaned.append(id(p)))
    log: list[tuple[str, int]] = []
    p = Processing(log)
    host.adopt(p)
    p.multilora_pass = object()  # the original's pass state, copied along by copy(p)
    q = copy.copy(p)
    host.adopt(q)
    assert "multilora_pass" not in vars(q) and "multilora_pass" in vars(p)
    q.close()
    assert log == [("close", id(q))] and cleaned == [id(q)]
    p.close()
    assert log[-1] == ("close", id(p)) and cleaned[-1] == id(p)


def test_a_wrapper_still_calls_the_method_when_cleanup_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(p: object) -> None:
        raise RuntimeError("cleanup failed")

    monkeypatch.setattr(host, "close_generation", broken)
    log: list[tuple[str, int]] = []
    p = Processing(log)
    host.adopt(p)
    with pytest.raises(RuntimeError, match="cleanup failed"):
        p.close()
    assert log == [("close", id(p))]
