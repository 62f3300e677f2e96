"""Is this checkpoint directory this run's? Checked before anything is loaded (no torch import).

* Resuming (``checkpoint.load=auto`` finding ``latest``, or an explicit ``checkpoint.load``)
  compares the run's model with the one in the checkpoint's ``config.yaml`` (written beside the
  step directories): any difference that changes parameters or computation is refused, naming
  each key with both values. Schedule and data changes stay allowed (the trainer warns about
  the LR schedule).
* A fresh run (``checkpoint.load=null``, or a ``load`` path outside this run's checkpoint
  directory) whose checkpoint directory already holds checkpoints is refused: its saves would be
  mixed with another run's (``latest``, ``keep_last`` pruning by step number). With
  ``checkpoint.overwrite=true`` the old checkpoints are deleted first.

The model is compared through the provider's ``architecture()`` (see
``loongforge.model_provider.ModelProvider``), which normalises defaults (an absent ``head_dim``
equals ``hidden_size / num_attention_heads``); for a provider without it, every ``model`` key
except :data:`NON_ARCHITECTURE_KEYS` (at any nesting level) is compared as written.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from loongforge.config import ConfigError
from loongforge.errors import LoongForgeError

CONFIG_FILE = "config.yaml"
LATEST = "latest"


class CheckpointError(LoongForgeError, RuntimeError):
    """A checkpoint that cannot be used; the message names the path."""


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or None when there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / "trainer_state.json").is_file():
        raise CheckpointError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path

#: ``model`` keys that change neither the parameters nor what the model computes
NON_ARCHITECTURE_KEYS = frozenset({
    "pretrained", "fusions", "use_cpu_initialization", "initializer_range", "torch_dtype", "dtype",
    "transformers_version", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "_name_or_path",
    "architectures", "attention_dropout", "transformer_config",
    "parallel",  # a component's own layout (e.g. the VLM's model.image_encoder.parallel.tp)
})


def _as_written(section: dict[str, Any]) -> dict[str, Any]:
    """The section minus :data:`NON_ARCHITECTURE_KEYS`, at every nesting level."""
    return {k: _as_written(v) if isinstance(v, dict) else v for k, v in section.items()
            if k not in NON_ARCHITECTURE_KEYS}


def checkpoint_root(cfg) -> Path:
    """The run's checkpoint directory (``checkpoint.dir``, default ``<output_dir>/checkpoints``)."""
    return Path(cfg.checkpoint.dir or Path(cfg.output_dir) / "checkpoints")


def _has_checkpoints(root: Path) -> bool:
    return (root / "latest").is_file() or any(p.is_dir() and p.suffix != ".tmp" for p in root.glob("step_*"))


def resume_source(cfg) -> Path | None:
    """The checkpoint this run will load (``None``: a fresh run)."""
    load = cfg.checkpoint.load
    if load == "auto":
        return latest_checkpoint(checkpoint_root(cfg))
    return Path(load) if load else None


def architecture(model_section: Any, plugins) -> dict[str, Any]:
    """What defines the model's parameters and computation, as a flat dict."""
    from omegaconf import DictConfig, OmegaConf

    section = OmegaConf.to_container(model_section, resolve=True) if isinstance(model_section, DictConfig) \
        else dict(model_section)
    record = plugins.registry().models.get(section.get("family")) if plugins is not None else None
    if record is not None:
        from loongforge.registry import load_object

        try:
            provider = load_object(record.builder)(section)
        except Exception:  # noqa: BLE001 - an unreadable section is compared as written
            provider = None
        if provider is not None and hasattr(provider, "architecture"):
            return {"family": section.get("family"), **provider.architecture()}
    return _as_written(section)


def check_resume(cfg, path: Path, plugins) -> None:
    """Refuse to load checkpoint ``path`` into a model other than the one it was trained as."""
    from omegaconf import OmegaConf

    saved_file = next((d / CONFIG_FILE for d in (path, path.parent) if (d / CONFIG_FILE).is_file()), None)
    if saved_file is None:
        return  # nothing to compare with (a checkpoint written by other tools)
    saved = OmegaConf.load(saved_file)
    ours, theirs = architecture(cfg.model, plugins), architecture(saved.get("model", {}), plugins)
    missing = "<not set>"
    diffs = [f"model.{k}: {theirs.get(k, missing)!r} in the checkpoint, {ours.get(k, missing)!r} in this run"
             for k in sorted(set(ours) | set(theirs), key=str) if ours.get(k, missing) != theirs.get(k, missing)]
    if diffs:
        raise ConfigError(
            f"checkpoint {path} was trained as another model ({saved_file}): " + "; ".join(diffs)
            + ". Use another output_dir (or checkpoint.dir) for this model, or checkpoint.load=null "
              "checkpoint.overwrite=true to delete that run's checkpoints."
        )


def prepare_checkpoint_dir(cfg, plugins, *, is_main: bool = True) -> Path | None:
    """Check the run's checkpoint directory before any process starts; return what it will load.

    A fresh run into a directory holding checkpoints is refused unless ``checkpoint.overwrite``
    (then the main process deletes them); a resumed run is checked with :func:`check_resume`.
    """
    root = checkpoint_root(cfg)
    source = resume_source(cfg)
    own = source is not None and root.resolve() in (source.resolve(), *source.resolve().parents)
    if not own and _has_checkpoints(root):
        if not cfg.checkpoint.get("overwrite", False):
            latest = (root / "latest").read_text().strip() if (root / "latest").is_file() else "no latest"
            how = "checkpoint.load=null" if source is None else f"checkpoint.load={source}"
            raise ConfigError(
                f"checkpoint directory {root} already holds another run's checkpoints ({latest}); with "
                f"{how} this run's saves would be mixed with them. Resume it with checkpoint.load=auto, "
                "use another output_dir (or checkpoint.dir), or set checkpoint.overwrite=true to delete them."
            )
        if is_main:
            for old in [*root.glob("step_*"), root / "latest", root / CONFIG_FILE]:
                if old.is_dir():
                    shutil.rmtree(old)
                elif old.exists():
                    old.unlink()
    if source is not None:
        check_resume(cfg, source, plugins)
    return source
