"""Shared by every tier: with ``MULTILORA_FAIL_ON_SKIP=1`` (set by .ci/run where the hosts are there), a skipped test
fails the run as a failed one does, so a tier that quietly lost its host, browser or package cannot pass green."""

from __future__ import annotations

import os

import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("MULTILORA_FAIL_ON_SKIP") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and exitstatus == pytest.ExitCode.OK:
        reporter.write_line(f"MULTILORA_FAIL_ON_SKIP: {len(skipped)} test(s) skipped: failing the run", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
