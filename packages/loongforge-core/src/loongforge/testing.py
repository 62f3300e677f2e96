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


def tiny_bf16_gpt(vocab_size: int = 96, seq: int = 16, **gpt_kwargs):
    """A 2-layer bf16 ``GPTModel`` (the local SDPA spec) in megatron-core's DDP, for optimizer and
    gradient tests inside :func:`single_process_megatron`. Returns ``(ddp_model, config)``."""
    import torch
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    from loongforge.modules.layer_spec import local_sdpa_spec

    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                               bf16=True, params_dtype=torch.bfloat16, hidden_dropout=0.0,
                               attention_dropout=0.0, normalization="RMSNorm", gated_linear_unit=True)
    model = GPTModel(config, local_sdpa_spec(config), vocab_size=vocab_size, max_sequence_length=seq, **gpt_kwargs)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True),
                                  Float16Module(config, model))
    return ddp, config


def megatron_adam(model, lr: float, clip_grad: float):
    """megatron-core's bf16 mixed-precision Adam(W) over ``model`` (weight decay 0.1)."""
    import torch
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    return get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=lr, weight_decay=0.1, clip_grad=clip_grad, bf16=True,
        params_dtype=torch.bfloat16), [model])


def megatron_train_step(model, optimizer, tokens, step_context=contextlib.nullcontext):
    """One training step of a DDP-wrapped ``GPTModel`` on ``tokens`` [b, s + 1] (next-token
    labels, mean loss), the optimizer stepping inside ``step_context()``. Returns ``(loss,
    (ok, grad_norm, zeros))``, the second as megatron-core's ``optimizer.step()`` gives it."""
    import torch

    b, s = tokens.shape[0], tokens.shape[1] - 1
    model.zero_grad_buffer()
    optimizer.zero_grad()
    loss = model(tokens[:, :-1], torch.arange(s).expand(b, s), None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    model.finish_grad_sync()
    with step_context():
        return loss.detach(), optimizer.step()
