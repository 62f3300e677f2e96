"""The release contract (docs/architecture.md "Releases and compatibility"): one version per
package, plugins depend on the hook API's major rather than a core minor, meta-package extras are
ranges that admit the workspace versions, and each package ships its LICENSE, py.typed, README
and CHANGELOG."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tarfile
import tomllib
from importlib.metadata import version
from pathlib import Path

import loongforge
import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[3]
PACKAGES = sorted(p for p in (REPO / "packages").iterdir() if (p / "pyproject.toml").is_file())
API_MAJOR = int(loongforge.API_VERSION.split(".")[0])


def _project(pkg: Path) -> dict:
    return tomllib.loads((pkg / "pyproject.toml").read_text())


def _module(pkg: Path) -> str:
    return Path(_project(pkg)["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"][0]).name


def _core_requirement(pkg: Path) -> Requirement:
    reqs = [Requirement(r) for r in _project(pkg)["project"]["dependencies"]]
    return next(r for r in reqs if r.name == "loongforge-core")


PLUGINS = [p for p in PACKAGES if _project(p)["project"]["name"] != "loongforge-core"]


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: p.name)
def test_version_is_written_once(pkg: Path):
    """``__version__`` is the installed metadata's version, which is the pyproject's."""
    project = _project(pkg)["project"]
    assert "version" in project
    module = importlib.import_module(_module(pkg))
    assert module.__version__ == version(project["name"]) == project["version"]
    init = (pkg / "src" / _module(pkg) / "__init__.py").read_text()
    assert project["version"] not in init, "the version is written in __init__.py too"


@pytest.mark.parametrize("pkg", PLUGINS, ids=lambda p: p.name)
def test_plugin_requires_the_hook_api_major_not_a_core_minor(pkg: Path):
    spec = _core_requirement(pkg).specifier
    core = Version(version("loongforge-core"))
    bumped_minor = Version(f"{core.major}.{core.minor + 1}.0")
    assert core in spec and bumped_minor in spec, f"{pkg.name}: {spec} refuses core {bumped_minor}"
    for same_api in (Version(f"{API_MAJOR}.0.0"), Version(f"{API_MAJOR}.9.0")):
        assert same_api in spec, f"{pkg.name}: {spec} refuses core {same_api} (hook API {API_MAJOR})"
    assert Version(f"{API_MAJOR + 1}.0.0") not in spec, f"{pkg.name}: {spec} admits the next hook API major"
    declared = importlib.import_module(f"{_module(pkg)}.plugin").LOONGFORGE_API_VERSION
    assert declared.split(".")[0] == str(API_MAJOR)


def test_core_0_2_0_resolves_with_every_unchanged_plugin(tmp_path):
    """A resolver run: core 0.2.0 (this tree's metadata, version bumped) with each plugin's
    requirement on it, offline, so only the version ranges decide."""
    core = _project(REPO / "packages" / "loongforge-core")["project"]
    reqs = tmp_path / "requirements.in"
    reqs.write_text("".join(f"{_core_requirement(p)}\n" for p in PLUGINS) + "loongforge-core==0.2.0\n")
    # a metadata-only stand-in for the core 0.2.0 wheel: same name, no dependencies to fetch
    dist = tmp_path / "core"
    (dist / "loongforge").mkdir(parents=True)
    (dist / "loongforge" / "__init__.py").write_text("")
    (dist / "pyproject.toml").write_text(
        f'[project]\nname = "{core["name"]}"\nversion = "0.2.0"\n'
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["loongforge"]\n')
    subprocess.run([sys.executable, "-m", "uv", "build", "--wheel", "--offline", "-q", "-o", str(tmp_path / "w"),
                    str(dist)], check=True, capture_output=True, timeout=300)
    out = subprocess.run([sys.executable, "-m", "uv", "pip", "compile", "--offline", "--no-index", "--find-links",
                          str(tmp_path / "w"), "--python-version", "3.12", str(reqs)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loongforge-core==0.2.0" in out.stdout


def test_meta_package_extras_are_ranges_that_admit_the_workspace():
    root = _project(REPO)["project"]
    versions = {_project(p)["project"]["name"]: Version(_project(p)["project"]["version"]) for p in PACKAGES}
    reqs = [Requirement(r) for r in root["dependencies"]]
    reqs += [Requirement(r) for extra in root["optional-dependencies"].values() for r in extra]
    for req in reqs:
        assert req.specifier, f"meta-package requirement {req} has no range"
        assert versions[req.name] in req.specifier, f"{req} refuses the workspace's {versions[req.name]}"
        assert not any(s.operator == "==" for s in req.specifier), f"{req} pins"
    assert {r.name for r in reqs} == set(versions)


@pytest.mark.parametrize("pkg", [REPO, *PACKAGES], ids=lambda p: p.name)
def test_package_files(pkg: Path):
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert (pkg / "LICENSE").read_text() == license_text
    assert _project(pkg)["project"]["license-files"] == ["LICENSE"]
    if pkg != REPO:
        assert (pkg / "src" / _module(pkg) / "py.typed").is_file()
        changelog = (pkg / "CHANGELOG.md").read_text()
        assert "## Unreleased" in changelog and f"## {_project(pkg)['project']['version']}" in changelog
        assert len((pkg / "README.md").read_text().splitlines()) >= 5, f"{pkg.name}: README is a stub"


def test_root_sdist_holds_only_the_meta_package(tmp_path):
    subprocess.run([sys.executable, "-m", "uv", "build", "--sdist", "--offline", "-q", "-o", str(tmp_path), str(REPO)],
                   check=True, capture_output=True, timeout=300)
    (sdist,) = tmp_path.glob("loongforge-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {Path(*Path(n).parts[1:]).as_posix() for n in tar.getnames() if len(Path(n).parts) > 1}
    assert names - {".gitignore"} == {"pyproject.toml", "README.md", "LICENSE", "PKG-INFO"}, sorted(names)


@pytest.mark.slow
def test_release_script_bumps_builds_smokes_and_prints_the_tag(tmp_path):
    """``scripts/release.py PACKAGE --bump minor`` on a copy of the repository: the version moves
    in pyproject.toml and uv.lock, the CHANGELOG gets the section, the wheel is built, installed in
    a clean venv with the core and smoke-tested, and the tag command is printed."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".venv", ".git", "outputs", "__pycache__", "bench",
                                                              "dist", "*.egg-info"))
    name = "loongforge-backend-xpu"
    old = Version(_project(copy / "packages" / name)["project"]["version"])
    new = f"{old.major}.{old.minor + 1}.0"
    out = subprocess.run([sys.executable, str(copy / "scripts" / "release.py"), name, "--bump", "minor"], cwd=copy,
                         capture_output=True, text=True, timeout=900, env={**os.environ, "UV_OFFLINE": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert _project(copy / "packages" / name)["project"]["version"] == new
    lock = tomllib.loads((copy / "uv.lock").read_text())
    assert next(p for p in lock["package"] if p["name"] == name)["version"] == new
    assert f"## {new} (" in (copy / "packages" / name / "CHANGELOG.md").read_text()
    assert f"smoke ok: {name}" in out.stdout and f"git tag {name}-v{new}" in out.stdout
    assert _project(REPO / "packages" / name)["project"]["version"] == str(old)  # the real tree is untouched
