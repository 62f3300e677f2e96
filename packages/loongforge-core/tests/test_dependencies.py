"""Every package declares what its source imports (in its own pyproject.toml).

The workspace venv holds every package and the dev group, so a missing declaration shows only
when a package is installed alone from its wheel. This test finds it earlier: it walks each
package's ``src/`` with ``ast``, collects the top-level module of every absolute import (module
level or inside a function: a lazy import is still needed when that code runs), drops the
standard library, maps each module to its distribution (our own packages from their
``pyproject.toml``, third-party ones through ``importlib.metadata.packages_distributions``) and
checks that the package's ``dependencies`` name it. An import guarded by ``try/except
ImportError`` may instead be declared as an optional extra.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions, requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[3]
PACKAGES = sorted(p for p in (REPO / "packages").iterdir() if (p / "pyproject.toml").is_file())

#: distributions a package needs although its own source never imports them: a dependency that
#: imports them without declaring them
UNDECLARED_UPSTREAM = {"loongforge-core": {"psutil": "megatron-core"}}


def _pyproject(pkg: Path) -> dict:
    return tomllib.loads((pkg / "pyproject.toml").read_text())


def _workspace_modules() -> dict[str, str]:
    """Top-level module -> distribution for our own packages (editable installs are not always
    visible to ``packages_distributions``)."""
    out = {}
    for pkg in PACKAGES:
        data = _pyproject(pkg)
        for path in data["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]:
            out[Path(path).name] = data["project"]["name"]
    return out


def _guards_import_error(node: ast.Try) -> bool:
    for handler in node.handlers:
        names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names):
            return True
    return False


def imported_modules(source: str) -> dict[str, bool]:
    """Top-level module of each absolute import -> whether every import of it is optional
    (inside the body of a ``try`` that catches ``ImportError``)."""
    found: dict[str, bool] = {}

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.Try):
            for child in node.body:
                visit(child, guarded or _guards_import_error(node))
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, guarded)
            return
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            top = name.split(".")[0]
            found[top] = found.get(top, True) and guarded
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(ast.parse(source), False)
    return found


def _declared(project: dict) -> tuple[set[str], set[str]]:
    required = {canonicalize_name(Requirement(r).name) for r in project.get("dependencies", [])}
    optional = {canonicalize_name(Requirement(r).name)
                for reqs in project.get("optional-dependencies", {}).values() for r in reqs}
    return required, optional


def test_imported_modules_reads_lazy_and_guarded_imports():
    src = ("import os, numpy.linalg\nfrom torch import nn\nfrom . import sibling\n"
           "def f():\n    import megatron.core\n"
           "try:\n    import flash_attn\nexcept ImportError:\n    flash_attn = None\n")
    assert imported_modules(src) == {"os": False, "numpy": False, "torch": False, "megatron": False,
                                     "flash_attn": True}


#: modules imported only on the GPU machine and deliberately in no lock: tilelang's apache-tvm-ffi pin
#: conflicts with flash-attn-4's in one uv.lock, so it is installed by hand there (kernels README);
#: the kernels import it only when present (``loongforge_kernels.dsa``)
NOT_LOCKED = {"tilelang": "loongforge-kernels"}


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: p.name)
def test_every_third_party_import_is_declared(pkg: Path):
    project = _pyproject(pkg)["project"]
    name = project["name"]
    required, optional = _declared(project)
    own = _workspace_modules()
    third_party = packages_distributions()
    modules: dict[str, tuple[bool, Path]] = {}
    for path in sorted((pkg / "src").rglob("*.py")):
        for module, guarded in imported_modules(path.read_text()).items():
            if module in sys.stdlib_module_names or module == "__future__":
                continue
            prev = modules.get(module, (True, path))
            modules[module] = (prev[0] and guarded, prev[1] if not prev[0] else path)
    problems = []
    for module, (guarded, path) in sorted(modules.items()):
        if own.get(module) == name:
            continue
        dists = [own[module]] if module in own else third_party.get(module)
        where = path.relative_to(REPO)
        if not dists and NOT_LOCKED.get(module) == name:
            continue
        if not dists:
            problems.append(f"{module!r} (imported in {where}) belongs to no installed distribution")
            continue
        declared = required | optional if guarded else required
        if not {canonicalize_name(d) for d in dists} & declared:
            problems.append(f"{where} imports {module!r} from {' or '.join(dists)}, which {name}'s "
                            f"pyproject.toml does not declare" + (" (not even as an extra)" if guarded else ""))
    assert not problems, "\n".join(problems)


def test_undeclared_upstream_dependencies_are_declared_here():
    for pkg in PACKAGES:
        project = _pyproject(pkg)["project"]
        required, _ = _declared(project)
        for dist, needed_by in UNDECLARED_UPSTREAM.get(project["name"], {}).items():
            assert dist in required, f"{project['name']} must declare {dist} ({needed_by} imports it)"
            # keep the entry only while it is needed: once upstream declares it, drop it here
            upstream = {canonicalize_name(Requirement(r).name) for r in requires(needed_by) or ()
                        if "extra ==" not in r}
            assert dist not in upstream, f"{needed_by} now declares {dist}: drop it from UNDECLARED_UPSTREAM"
