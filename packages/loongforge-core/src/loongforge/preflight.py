"""Everything about a run that can be checked before any process starts (no torch import).

``loongforge run`` calls :func:`preflight` in the launching process, before torchrun starts any
worker, so a user error is printed once, as one line, and the command exits 2. The workers it
launches skip it (``LOONGFORGE_PREFLIGHT=done`` in their environment).
"""

from __future__ import annotations

import os

from loongforge.config import ConfigError

#: set in the environment of the processes ``loongforge run`` launches once it has checked the run
PREFLIGHT_ENV = "LOONGFORGE_PREFLIGHT"


def world_size_of(launch: list[str]) -> int | None:
    """The world size torchrun's flags give (``--nproc-per-node N [--nnodes M]``); None if unknown."""
    values, i = {}, 0
    while i < len(launch):
        name, _, value = launch[i].partition("=")
        if not value and i + 1 < len(launch) and not launch[i + 1].startswith("--"):
            value, i = launch[i + 1], i + 1
        values[name.replace("_", "-")] = value
        i += 1
    try:
        nproc = int(values.get("--nproc-per-node", "1"))
        nnodes = values.get("--nnodes", "1")
        return nproc * int(nnodes)
    except ValueError:
        return None  # "auto", "gpu", "1:4" (elastic): known only at launch


def check_train(cfg) -> None:
    """Counts that megatron-core would only reject deep inside a worker."""
    t = cfg.train
    for key in ("steps", "seq_length", "micro_batch_size", "global_batch_size", "log_interval", "eval_steps"):
        if t[key] is None or t[key] < 1:
            raise ConfigError(f"config key 'train.{key}' must be >= 1, got {t[key]}")
    if t.eval_interval < 0 or cfg.checkpoint.save_interval < 0:
        key = "train.eval_interval" if t.eval_interval < 0 else "checkpoint.save_interval"
        raise ConfigError(f"config key {key!r} must be >= 0 (0: off)")
    if cfg.checkpoint.keep_last is not None and cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"config key 'checkpoint.keep_last' must be >= 1 or null, got {cfg.checkpoint.keep_last}")


def preflight(cfg, plugins, world_size: int | None = 1):
    """Check ``cfg`` for a world of ``world_size`` processes (None: unknown yet) and prepare its
    checkpoint directory; returns ``cfg`` (with ``model.pretrained`` resolved)."""
    from loongforge.model_section import check_pretrained_weights, model_provider
    from loongforge.parallel import validate_layout
    from loongforge.trainer.compat import prepare_checkpoint_dir

    check_train(cfg)
    family = cfg.model.get("family")
    if family in plugins.registry().models:
        model_provider(cfg, plugins)  # the family validates its section (unknown keys, unsupported fields)
    if cfg.model.get("pretrained"):
        check_pretrained_weights(cfg.model.pretrained)
    if world_size is not None:
        m = cfg.model
        validate_layout(cfg, world_size, m.get("num_hidden_layers"), m.get("num_attention_heads"),
                        m.get("num_key_value_heads"))
    # under a plain `torchrun -m loongforge.cli run` every rank checks; only rank 0 deletes
    prepare_checkpoint_dir(cfg, plugins, is_main=os.environ.get("RANK", "0") == "0")
    return cfg


def done() -> bool:
    return os.environ.get(PREFLIGHT_ENV) == "done"
