"""Release one package, or check that packages install and work from their wheels.

    python3 scripts/release.py loongforge-core --bump minor      # or --version 0.2.0
    python3 scripts/release.py --check all                      # CI: every package, no bump,
                                                                # and loongforge[all] from the wheels

A release: bump the package's version in its pyproject.toml and ``uv.lock`` (``uv version``),
move its CHANGELOG's "Unreleased" entries under the new version, build its wheel with
``uv build --package X --no-sources`` (and the wheels of the workspace packages it needs, the
core for a plugin, from the tree), install them into a clean venv (``uv venv`` + ``uv pip
install``: only the declared dependencies come in), run ``scripts/smoke.py X`` there, and print
the tag command (``<distribution>-v<version>``). The commit and the tag are left to you.

Installs are constrained to the versions in ``uv.lock`` (``uv export``), so they come from uv's
cache; ``--latest`` resolves the newest releases inside the declared ranges instead.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from smoke import PACKAGES, SMOKE_NEEDS  # noqa: E402


def uv(*args: str, **kwargs) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "uv", *args]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise SystemExit(f"failed: uv {' '.join(args)}\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return result


def project(name: str) -> dict:
    return tomllib.loads((REPO / "packages" / name / "pyproject.toml").read_text())["project"]


def workspace_needs(name: str) -> list[str]:
    """``name`` and the workspace packages it needs (its dependencies, transitively, and what its
    smoke test needs), dependencies first."""
    from packaging.requirements import Requirement

    order: list[str] = []

    def visit(dist: str) -> None:
        if dist in order:
            return
        for req in project(dist).get("dependencies", []):
            if (dep := Requirement(req).name) in PACKAGES:
                visit(dep)
        for dep in SMOKE_NEEDS.get(dist, ()) if dist == name else ():
            visit(dep)
        order.append(dist)

    visit(name)
    return order


def bump(name: str, bump_kind: str | None, new_version: str | None) -> str:
    value = [new_version] if new_version else ["--bump", bump_kind]
    uv("version", "--package", name, *value, "--no-sync")  # rewrites pyproject.toml and uv.lock
    version = project(name)["version"]
    changelog = REPO / "packages" / name / "CHANGELOG.md"
    text = changelog.read_text()
    if "## Unreleased\n" not in text:
        raise SystemExit(f"{changelog} has no '## Unreleased' section")
    today = datetime.date.today().isoformat()
    changelog.write_text(text.replace("## Unreleased\n", f"## Unreleased\n\n## {version} ({today})\n", 1))
    return version


def build(names: list[str], out: Path) -> dict[str, Path]:
    wheels = {}
    for dist in names:
        uv("build", "--package", dist, "--no-sources", "--wheel", "-q", "-o", str(out))
        wheels[dist] = next(out.glob(f"{dist.replace('-', '_')}-{project(dist)['version']}-*.whl"))
    return wheels


def check(name: str, wheels: dict[str, Path], work: Path, latest: bool) -> float:
    """Install ``name``'s wheel (and the workspace wheels it needs) into a clean venv and run its
    smoke test there; returns the seconds it took."""
    start = time.perf_counter()
    venv = work / f"venv-{name}"
    uv("venv", "-q", "--clear", "--python", sys.executable, str(venv))
    python = venv / "bin" / "python"
    install = ["pip", "install", "-q", "--python", str(python), *(str(wheels[d]) for d in workspace_needs(name))]
    if not latest:
        install += ["--constraint", str(constraints(work))]
    uv(*install)
    smoke = subprocess.run([str(python), str(REPO / "scripts" / "smoke.py"), name], cwd=work,
                           capture_output=True, text=True)
    print(smoke.stdout, end="")
    if smoke.returncode != 0:
        raise SystemExit(smoke.stderr[-6000:] or f"smoke test of {name} failed")
    return time.perf_counter() - start


def check_meta(wheels: dict[str, Path], work: Path) -> float:
    """The meta-package as users install it: ``loongforge[all]`` (the root project's wheel, its
    extras' ranges resolved against the wheels built here) in a clean venv lists every plugin."""
    start = time.perf_counter()
    uv("build", "--wheel", "--no-sources", "-q", "-o", str(work / "dist"), str(REPO))
    venv = work / "venv-meta"
    uv("venv", "-q", "--clear", "--python", sys.executable, str(venv))
    uv("pip", "install", "-q", "--python", str(venv / "bin" / "python"), "--find-links", str(work / "dist"),
       "--constraint", str(constraints(work)), "loongforge[all]")
    out = subprocess.run([str(venv / "bin" / "loongforge"), "plugins"], capture_output=True, text=True, cwd=work)
    missing = [name for _, name in PACKAGES.values() if f" {name} " not in out.stdout]
    if out.returncode != 0 or missing:
        raise SystemExit(f"loongforge[all] does not list {missing}:\n{out.stdout}{out.stderr}")
    print("smoke ok: loongforge[all] lists every plugin")
    return time.perf_counter() - start


def constraints(work: Path) -> Path:
    """uv.lock's versions as pip constraints (third-party packages only)."""
    path = work / "constraints.txt"
    if not path.exists():
        uv("export", "--all-packages", "--no-emit-workspace", "--no-hashes", "--no-dev", "--all-extras",
           "--frozen", "-q", "-o", str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", nargs="?", choices=sorted(PACKAGES))
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--bump", choices=["major", "minor", "patch"], help="release with this version bump")
    group.add_argument("--version", help="release as this exact version")
    group.add_argument("--check", nargs="+", metavar="PACKAGE",
                       help="no release: build and smoke-test these packages ('all' for every one)")
    parser.add_argument("--latest", action="store_true", help="newest dependencies in range, not uv.lock's")
    parser.add_argument("--keep", type=Path, help="build and install under this directory and keep it")
    args = parser.parse_args(argv)

    if args.check:
        targets = sorted(PACKAGES) if args.check == ["all"] else args.check
        unknown = set(targets) - set(PACKAGES)
        if unknown:
            parser.error(f"unknown package(s): {', '.join(sorted(unknown))}")
    elif args.package and (args.bump or args.version):
        targets = [args.package]
    else:
        parser.error("give PACKAGE with --bump/--version, or --check PACKAGE... / --check all")

    with tempfile.TemporaryDirectory(prefix="loongforge-release-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        version = bump(args.package, args.bump, args.version) if not args.check else None
        needed = sorted({d for t in targets for d in workspace_needs(t)})
        t0 = time.perf_counter()
        wheels = build(needed, work / "dist")
        print(f"built {len(wheels)} wheels in {time.perf_counter() - t0:.1f} s")
        for name in targets:
            print(f"{name}: clean venv + smoke test took {check(name, wheels, work, args.latest):.1f} s")
        if args.check == ["all"]:
            print(f"loongforge[all]: clean venv + plugins took {check_meta(wheels, work):.1f} s")
        if version:
            tag = f"{args.package}-v{version}"
            print(f"\n{args.package} {version} built and smoke-tested ({wheels[args.package].name}).\n"
                  f"Commit pyproject.toml, uv.lock and CHANGELOG.md, then tag and push:\n"
                  f"  git commit -am 'Release {args.package} {version}' && git tag {tag} && git push origin {tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
