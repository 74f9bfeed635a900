"""tests/hosts without building anything: the recipe applied to a requirements file, the cache key, the one-line
errors, and the fail-on-skip switch that .ci/run sets."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.hosts import setup
from tests.hosts.recipes import RECIPES

TESTS = Path(__file__).resolve().parents[1]


def test_requirements_apply_the_recipe(tmp_path: Path) -> None:
    """CRLF stripped, comments dropped, torch left out, setuptools replaced, extras added, the rest as written."""
    (tmp_path / "requirements_versions.txt").write_bytes(
        b"setuptools==69.5.1  # temp fix\r\nGitPython==3.1.32\r\n# a comment\r\ntorch\r\nPillow==9.5.0\r\n"
    )
    recipe = RECIPES["a1111"]
    assert setup.requirements(recipe, tmp_path) == [
        "setuptools>=77.0.3,<81",
        "GitPython==3.1.32",
        "Pillow==9.5.0",
        *recipe.extra,
    ]


def test_a_requirement_given_by_url_is_replaced_by_its_name(tmp_path: Path) -> None:
    (tmp_path / "requirements_versions.txt").write_text(
        "https://example.invalid/releases/pydantic-1.10.15-py3-none-any.whl\nnumpy==1.26.4\n"
    )
    recipe = dataclasses.replace(RECIPES["forge"], replace=(("pydantic", "pydantic==1.10.15"),), extra=())
    assert setup.requirements(recipe, tmp_path) == ["pydantic==1.10.15", "numpy==1.26.4"]


def test_the_cache_key_follows_the_source_and_the_recipe() -> None:
    recipe = RECIPES["forge"]
    key = setup.cache_key(recipe, "abc")
    assert key == setup.cache_key(recipe, "abc")
    assert key != setup.cache_key(recipe, "abd")
    assert key != setup.cache_key(dataclasses.replace(recipe, extra=("joblib", "x")), "abc")


def test_a_missing_tarball_and_an_unknown_host_say_which(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MULTILORA_HOSTS_DIR", str(tmp_path))
    with pytest.raises(setup.SetupError, match=r"no forge-\*\.tar\.gz in .*MULTILORA_HOSTS_DIR"):
        setup.setup("forge")
    with pytest.raises(setup.SetupError, match="unknown host 'comfy': one of a1111, forge"):
        setup.setup("comfy")


@pytest.mark.parametrize(("switch", "code"), [("1", 1), ("", 0)])
def test_a_skipped_test_fails_the_run_only_when_asked(tmp_path: Path, switch: str, code: int) -> None:
    """tests/conftest.py's MULTILORA_FAIL_ON_SKIP, loaded as a plugin into a run of one passing and one skipped test."""
    (tmp_path / "test_one.py").write_text(
        "import pytest\n\ndef test_skips():\n    pytest.skip('no host')\n\ndef test_passes():\n    pass\n"
    )
    env = {**os.environ, "PYTHONPATH": str(TESTS), "MULTILORA_FAIL_ON_SKIP": switch}
    command = [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-q", str(tmp_path)]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == code, done.stdout + done.stderr
