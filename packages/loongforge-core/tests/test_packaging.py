"""Each package builds a wheel holding its LICENSE and py.typed. (Each wheel installed alone with
the core into a clean venv, where the workspace venv cannot hide a missing dependency declaration,
is CI's wheel stage: ``scripts/release.py --check all`` runs ``scripts/smoke.py`` per package.)"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
PACKAGES = sorted(p.name for p in (REPO / "packages").iterdir() if (p / "pyproject.toml").is_file())


def uv(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "uv", *args], cwd=cwd, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheels")
    for name in PACKAGES:
        uv("build", "--package", name, "--no-sources", "--wheel", "-o", str(out))
    return out


def test_every_package_builds_a_wheel(wheels):
    built = {p.name.split("-")[0] for p in wheels.glob("*.whl")}
    assert built == {name.replace("-", "_") for name in PACKAGES}
    for wheel in wheels.glob("*.whl"):
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), wheel.name
        assert any(n.endswith("/py.typed") for n in names), wheel.name
