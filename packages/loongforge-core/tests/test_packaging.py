"""Each package builds a wheel, and core + llm installed alone into a fresh venv work without the
other seven packages (the workspace venv would hide a missing dependency declaration)."""

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


@pytest.mark.slow
def test_core_and_llm_alone_in_a_fresh_venv(wheels, tmp_path):
    venv = tmp_path / "venv"
    uv("venv", "--python", sys.executable, str(venv))
    python = venv / "bin" / "python"
    core, llm = (next(wheels.glob(f"{n}-*.whl")) for n in ("loongforge_core", "loongforge_models_llm"))
    # dependencies resolve from uv's cache (filled by the workspace sync), not from the workspace
    uv("pip", "install", "--python", str(python), str(core), str(llm))
    check = subprocess.run(
        [str(python), "-c",
         "import importlib.util as u, loongforge, loongforge_llm\n"
         "from loongforge.plugins import create_plugin_manager\n"
         "pm = create_plugin_manager()\n"
         "print(sorted(p.name for p in pm.plugins), [p.error for p in pm.failures])\n"
         "print(sorted(pm.registry().models))\n"
         "print([m for m in ('loongforge_vlm', 'loongforge_cuda', 'loongforge_ckpt') if u.find_spec(m)])"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert check.returncode == 0, check.stderr[-3000:]
    plugins, models, others = check.stdout.strip().splitlines()
    assert plugins == "['core', 'llm'] []"
    assert "qwen3" in models and "llama" in models
    assert others == "[]"
