"""Several training runs in one launch: ``loongforge run``'s own code path, once per run.

    python -m torch.distributed.run --nproc-per-node N train_worker.py RUNS.json

``RUNS.json`` is a list of ``{"config": PATH, "overrides": [...]}``; each entry is composed and
run exactly as ``loongforge run CONFIG OVERRIDES...`` runs it in every rank (``cli.cmd_run``:
compose, look up the task, call it), one after the other in the same processes. The runtime
creates and destroys the process groups and megatron-core's parallel state around each run, so a
run sees a fresh world; what is shared is the interpreter, which saves each process importing
torch and megatron-core once per run (about 20 s of CPU each, most of a tiny run's cost on a
2-core machine). A run that fails raises, so the launcher exits non-zero.

Each run rendezvouses on a port of its own (rank 0 hosts the store): a second
``init_process_group`` on torchrun's agent store finds the first one's keys (the group counter
restarts after ``destroy_process_group``) and gloo connects to stale addresses.
"""

from __future__ import annotations

import datetime
import json
import os
import sys


def _fresh_rendezvous(index: int) -> None:
    """Point ``env://`` at a new port for run ``index``, agreed through the launcher's store."""
    import torch.distributed as dist
    from loongforge.testing import free_port

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["TORCHELASTIC_MASTER_PORT"]),
                          is_master=False, timeout=datetime.timedelta(minutes=5))
    key = f"train_worker/run{index}/port"
    if os.environ["RANK"] == "0":
        store.set(key, str(free_port()))
    os.environ["MASTER_PORT"] = store.get(key).decode()
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"


def main(runs_file: str) -> None:
    from loongforge.config import compose_config
    from loongforge.plugins import get_plugin_manager
    from loongforge.trainer.loop import run as run_task

    plugins = get_plugin_manager()
    os.environ.setdefault("TORCHELASTIC_MASTER_PORT", os.environ.get("MASTER_PORT", "0"))
    for index, run in enumerate(json.loads(open(runs_file).read())):
        _fresh_rendezvous(index)
        cfg = compose_config(run["config"], run["overrides"])
        run_task(cfg, plugins)


if __name__ == "__main__":
    main(sys.argv[1])
