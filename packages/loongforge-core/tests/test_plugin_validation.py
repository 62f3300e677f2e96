"""Each plugin is validated on its own: a hook implementation its spec refuses, a hook this core
does not have, or a newer hook API minor refuses THAT plugin by name, and the rest load; plugin
discovery imports no torch; asking for something a known, uninstalled package provides names the
package and its install command."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from loongforge import API_VERSION
from loongforge.plugins import RegistryError, create_plugin_manager, lookup
from loongforge.testing import run_cli

MAJOR, MINOR = (int(x) for x in API_VERSION.split("."))

#: entry-point name -> plugin module source
BAD_PLUGINS = {
    "badsig": """
        from loongforge import hookimpl
        LOONGFORGE_API_VERSION = "{api}"

        @hookimpl
        def loongforge_on_step_end(trainer, step, metrics, extra):  # 'extra' is not in the spec
            pass
    """,
    "unknownhook": """
        from loongforge import hookimpl
        LOONGFORGE_API_VERSION = "{api}"

        @hookimpl
        def loongforge_register_modles():  # misspelled
            return []
    """,
    "newerminor": """
        from loongforge import hookimpl
        LOONGFORGE_API_VERSION = "{newer}"

        @hookimpl
        def loongforge_register_tasks():
            return []
    """,
    "fine": """
        from loongforge import hookimpl
        from loongforge.registry import Task
        LOONGFORGE_API_VERSION = "{api}"

        @hookimpl
        def loongforge_register_tasks():
            return [Task(name="fine_task", run="loongforge_fine:run")]
    """,
}


@pytest.fixture(scope="module")
def bad_site(tmp_path_factory) -> Path:
    """Installed-looking distributions (dist-info with entry points) of the plugins above."""
    site = tmp_path_factory.mktemp("bad_site")
    for name, source in BAD_PLUGINS.items():
        module = f"loongforge_{name}"
        (site / f"{module}.py").write_text(textwrap.dedent(source.format(api=API_VERSION, newer=f"{MAJOR}.{MINOR + 1}")))
        info = site / f"loongforge_{name}-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: loongforge-{name}\nVersion: 1.2.3\n")
        (info / "entry_points.txt").write_text(f"[loongforge.plugins]\n{name} = {module}\n")
    return site


def test_each_bad_plugin_is_refused_by_name_and_the_rest_load(bad_site, monkeypatch):
    monkeypatch.syspath_prepend(str(bad_site))
    pm = create_plugin_manager()
    errors = {p.name: p.error for p in pm.failures}
    assert set(errors) == {"badsig", "unknownhook", "newerminor"}
    assert "invalid hook implementation" in errors["badsig"] and "extra" in errors["badsig"]
    assert "loongforge_register_modles" in errors["unknownhook"] and API_VERSION in errors["unknownhook"]
    assert f"{MAJOR}.{MINOR + 1}" in errors["newerminor"] and "upgrade loongforge-core" in errors["newerminor"]
    loaded = {p.name for p in pm.plugins if not p.error}
    assert {"core", "fine", "llm"} <= loaded
    assert "fine_task" in pm.registry().tasks  # the registry builds from the valid plugins
    # a refused plugin's hooks are not registered: no hook caller still holds it
    assert all(impl.plugin_name not in errors for impl in pm.hook.loongforge_on_step_end.get_hookimpls())


def test_cli_lists_refusals_and_other_commands_still_work(bad_site):
    listing = run_cli("plugins", extra_path=bad_site)
    assert listing.returncode == 1 and "Traceback" not in listing.stderr
    for name in ("badsig", "unknownhook", "newerminor"):
        line = next(line for line in listing.stdout.splitlines() if f" {name} " in line)
        assert "REFUSED" in line and "loongforge-" + name in line
    models = run_cli("models", extra_path=bad_site)
    assert models.returncode == 0, models.stderr[-2000:]
    assert "qwen3" in models.stdout and "not loaded" in models.stderr


def test_discovery_imports_no_torch():
    code = ("import sys, time\nt = time.perf_counter()\n"
            "from loongforge.plugins import create_plugin_manager\n"
            "pm = create_plugin_manager(); pm.registry()\n"
            "assert not pm.failures, pm.failures\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'megatron', 'transformers', 'triton')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_lookup_names_the_package_that_provides_a_name(monkeypatch):
    from loongforge import known_packages

    monkeypatch.setattr(known_packages, "_missing", lambda dist: "not installed")
    with pytest.raises(RegistryError) as exc:
        lookup({"pretrain": 1, "sft": 2}, "vlm_sft", "task (config key 'task')")
    msg = str(exc.value)
    assert "loongforge-models-vlm" in msg and "pip install 'loongforge[vlm]'" in msg
    assert "Did you mean" not in msg  # not "did you mean 'sft'"
    with pytest.raises(RegistryError, match=r"install loongforge-ckpt \(pip install 'loongforge\[ckpt\]'\)"):
        lookup({}, "hf-to-mcore", "converter")
    with pytest.raises(RegistryError, match="Did you mean 'sft'"):  # an unknown name keeps the suggestion
        lookup({"pretrain": 1, "sft": 2}, "sfft", "task")


def test_config_group_of_a_missing_package_is_named(monkeypatch):
    from loongforge import known_packages

    monkeypatch.setattr(known_packages, "_missing", lambda dist: "not installed")
    hint = known_packages.hint_for_hydra_message(
        "In 'run': Could not find 'models/image_encoder/qwen2_5_vit'\n\nAvailable options in 'models': qwen3")
    assert "loongforge-models-vlm" in hint and "pip install 'loongforge[vlm]'" in hint


@pytest.mark.parametrize(("argv", "dist"), [
    (["run"], "loongforge-models-llm"),
    (["run", "qwen2_5_vl_tiny"], "loongforge-models-vlm"),
    (["config", "show", "sft_demo"], "loongforge-models-llm"),
    (["convert", "hf-to-mcore", "a", "b"], "loongforge-ckpt"),
])
def test_cli_names_the_package_left_out(argv, dist):
    """Core alone (every plugin left out): the command says which package holds what it asked
    for (the clean-venv smoke test of the core checks the 'not installed' wording)."""
    result = run_cli(*argv, env={"LOONGFORGE_LOAD_PLUGINS": ""})
    assert result.returncode == 2, result.stdout + result.stderr
    assert dist in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "initialize_config_dir" not in result.stderr and "Cannot find primary config" not in result.stderr


def test_task_of_a_left_out_package_is_named(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("defaults:\n  - /models/qwen3@model: qwen3_demo\n  - _self_\ntask: vlm_sft\n")
    result = run_cli("run", str(cfg), env={"LOONGFORGE_LOAD_PLUGINS": "llm"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "loongforge-models-vlm" in result.stderr and "Did you mean" not in result.stderr


def test_requested_backend_of_a_missing_package_is_named(monkeypatch):
    from loongforge import builtin, known_packages
    from loongforge.backends.cpu import CpuBackend
    from loongforge.config import ConfigError

    monkeypatch.setattr(known_packages, "_missing", lambda dist: "not installed")
    with pytest.raises(ConfigError, match=r"install loongforge-backend-xpu \(pip install 'loongforge\[xpu\]'\)"):
        builtin.loongforge_select_backend(available=[CpuBackend()], requested="xpu")
