"""Shared fixtures: third-party plugin packages installed into a temporary site directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
PLUGIN_PACKAGES = REPO / "tests" / "plugins"


@pytest.fixture(scope="session")
def third_party_site(tmp_path_factory) -> Path:
    """A directory with the example, broken and incompatible plugins pip-installed into it."""
    site = tmp_path_factory.mktemp("site")
    for name in ("example_plugin", "broken_plugin", "incompatible_plugin"):
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
             "--no-index", "--target", str(site), str(PLUGIN_PACKAGES / name)],
            check=True,
        )
    return site


@pytest.fixture
def with_third_party(third_party_site, monkeypatch):
    """Make the installed third-party plugins importable and discoverable in this process."""
    monkeypatch.syspath_prepend(str(third_party_site))
    return third_party_site
