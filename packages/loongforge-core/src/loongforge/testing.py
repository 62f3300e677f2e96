"""Helpers for plugin authors' tests: megatron-core on the CPU backend in one process."""

from __future__ import annotations

import contextlib
import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_process_megatron(seed: int = 1234):
    """A world of one gloo process with megatron-core's parallel state and the CPU backend active."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from loongforge.backends.cpu import CpuBackend

    backend = CpuBackend()
    owns_pg = not dist.is_initialized()
    if owns_pg:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        with backend.activate():
            parallel_state.initialize_model_parallel(1, 1)
            backend.manual_seed(seed)
            try:
                yield backend
            finally:
                parallel_state.destroy_model_parallel()
    finally:
        if owns_pg:
            dist.destroy_process_group()


def run_cli(*args: str, extra_path=None, cwd=None, env: dict | None = None, timeout: int = 900):
    """Run the ``loongforge`` CLI in a subprocess (``extra_path`` is prepended to PYTHONPATH)."""
    import subprocess
    import sys

    full_env = {**os.environ, **(env or {})}
    if extra_path is not None:
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), full_env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "loongforge.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=full_env, timeout=timeout)
