"""Backend conformance: what the trainer asks of a :class:`loongforge.backend.Backend`, checked
on the real device. A backend plugin's tests call these with its factory path::

    from loongforge import backend_conformance as conformance

    def test_my_backend_conforms(tmp_path):
        conformance.check_all("my_pkg.backend:MyBackend", tmp_path)

Each check raises ``AssertionError`` naming what is wrong:

- :func:`check_device`: ``device()``, ``activate()``, tensors on the device, ``synchronize()``;
- :func:`check_collectives`: in ``world_size`` real processes on ``collective_backend``, the
  collectives the trainer and megatron-core use: ``all_reduce`` (SUM, MAX, AVG), ``all_gather``
  and ``all_gather_into_tensor``, ``reduce_scatter_tensor``, ``broadcast``, ``barrier``;
- :func:`check_rng`: ``manual_seed`` is deterministic, ``rng_state()``/``set_rng_state()``
  restore the host, device and megatron-core tracker streams exactly, and the state is a tree of
  tensors (the checkpoint stores it with safetensors);
- :func:`check_memory_stats` and :func:`check_peak_flops`: types and ranges;
- :func:`check_layer_spec`: ``layer_spec()`` builds a 2-layer megatron-core ``GPTModel`` whose
  forward pass on the device gives finite logits;
- :func:`check_training_resume`: ``loongforge run`` on the backend for 3 steps equals 2 steps, a
  checkpoint and a resumed third step (needs a model-family plugin for ``config``, the llm
  package's ``default`` unless told otherwise).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

#: small, fast overrides for the training check (on top of the config's own)
TINY_RUN = ("train.seq_length=32", "train.micro_batch_size=4", "train.global_batch_size=4", "train.log_interval=1",
            "train.eval_interval=0", "scheduler.warmup_steps=1", "checkpoint.save_interval=2")


def load_backend(factory: str):
    from loongforge.registry import load_object

    return load_object(factory)()


def _free_port() -> int:
    from loongforge.testing import free_port

    return free_port()


@contextlib.contextmanager
def _world_of_one(backend):
    """A one-process ``torch.distributed`` world on the backend, with megatron-core's parallel state."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    with backend.activate(0):
        dist.init_process_group(backend.collective_backend, rank=0, world_size=1, store=dist.HashStore())
        try:
            parallel_state.initialize_model_parallel(1, 1)
            yield backend
        finally:
            parallel_state.destroy_model_parallel()
            dist.destroy_process_group()


def check_device(backend) -> None:
    import torch

    device = backend.device(0)
    assert isinstance(device, torch.device), f"{backend.name}: device() returned {device!r}, not a torch.device"
    with backend.activate(0):
        x = torch.arange(6, dtype=torch.float32, device=device).reshape(2, 3)
        y = (x @ x.T).sum()
        backend.synchronize()
        assert y.device.type == device.type, f"{backend.name}: computed on {y.device}, expected {device}"
        assert y.item() == 83.0, f"{backend.name}: x @ x.T summed to {y.item()}, expected 83"


def _draw(backend) -> list:
    import torch
    from megatron.core.tensor_parallel import random as mcore_random

    device = backend.device(0)
    out = [torch.rand(4), torch.rand(4, device=device).cpu()]
    with mcore_random.get_cuda_rng_tracker().fork():  # the model-parallel (dropout) stream
        out.append(torch.rand(4, device=device).cpu())
    return out


def _tensor_tree(state, path="state") -> None:
    import torch

    if isinstance(state, dict):
        for key, value in state.items():
            _tensor_tree(value, f"{path}.{key}")
    else:
        assert isinstance(state, torch.Tensor), f"{path} is a {type(state).__name__}, not a tensor"


def check_rng(backend) -> None:
    import torch

    with _world_of_one(backend):
        backend.manual_seed(1234)
        state = backend.rng_state()
        _tensor_tree(state)
        first = _draw(backend)
        backend.set_rng_state(state)
        again = _draw(backend)
        for a, b, what in zip(first, again, ("host", "device", "tracker"), strict=True):
            assert torch.equal(a, b), f"{backend.name}: set_rng_state() does not restore the {what} stream"
        backend.manual_seed(1234)
        assert all(torch.equal(a, b) for a, b in zip(first, _draw(backend), strict=True)), \
            f"{backend.name}: manual_seed() is not deterministic"
        backend.manual_seed(4321)
        assert not torch.equal(first[1], _draw(backend)[1]), f"{backend.name}: the seed does not reach the device"


def check_memory_stats(backend) -> None:
    import torch

    with backend.activate(0):
        backend.reset_peak_memory()
        x = torch.empty(1 << 20, device=backend.device(0))
        stats = backend.memory_stats()
        del x
    assert isinstance(stats, dict), f"{backend.name}: memory_stats() returned {type(stats).__name__}"
    for key, value in stats.items():
        assert isinstance(value, float) and value >= 0, f"{backend.name}: memory_stats()[{key!r}] = {value!r}"


def check_peak_flops(backend) -> None:
    with backend.activate(0):
        for dtype in ("bf16", "fp32"):
            value = backend.peak_flops(dtype)
            assert value is None or (isinstance(value, float) and value > 1e9), \
                f"{backend.name}: peak_flops({dtype!r}) = {value!r}: None or FLOP/s"


def check_layer_spec(backend) -> None:
    import torch
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.spec_utils import ModuleSpec

    with _world_of_one(backend):
        backend.manual_seed(0)
        config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                                   hidden_dropout=0.0, attention_dropout=0.0, normalization="RMSNorm",
                                   gated_linear_unit=True, use_cpu_initialization=True)
        spec = backend.layer_spec(config, None)
        assert isinstance(spec, ModuleSpec), f"{backend.name}: layer_spec() returned {type(spec).__name__}"
        device = backend.device(0)
        model = GPTModel(config, spec, vocab_size=64, max_sequence_length=16).to(device)
        tokens = torch.randint(0, 64, (2, 16), device=device)
        logits = model(tokens, torch.arange(16, device=device).expand(2, 16), None)
        assert logits.shape == (2, 16, 64) and torch.isfinite(logits).all(), f"{backend.name}: bad logits"


def _collectives_worker(rank: int, world: int, factory: str, port: int) -> None:
    import torch
    import torch.distributed as dist

    backend = load_backend(factory)
    with backend.activate(rank):
        store = dist.TCPStore("127.0.0.1", port, world, rank == 0)
        dist.init_process_group(backend.collective_backend, rank=rank, world_size=world, store=store)
        try:
            device = backend.device(rank)
            base = torch.arange(4, dtype=torch.float32, device=device)
            x = base + rank
            dist.all_reduce(x)
            expect = world * base + sum(range(world))
            assert torch.equal(x.cpu(), expect.cpu()), f"all_reduce SUM: {x}"
            x = base + rank
            dist.all_reduce(x, op=dist.ReduceOp.MAX)
            assert torch.equal(x.cpu(), (base + world - 1).cpu()), f"all_reduce MAX: {x}"
            x = base + rank
            dist.all_reduce(x, op=dist.ReduceOp.AVG)
            assert torch.allclose(x.cpu(), (expect / world).cpu()), f"all_reduce AVG: {x}"
            parts = [torch.empty(4, device=device) for _ in range(world)]
            dist.all_gather(parts, base + rank)
            assert all(torch.equal(p.cpu(), (base + r).cpu()) for r, p in enumerate(parts)), "all_gather"
            flat = torch.empty(4 * world, device=device)
            dist.all_gather_into_tensor(flat, base + rank)
            assert torch.equal(flat.cpu(), torch.cat([base + r for r in range(world)]).cpu()), "all_gather_into_tensor"
            out = torch.empty(2, device=device)
            dist.reduce_scatter_tensor(out, torch.arange(2 * world, dtype=torch.float32, device=device) * (rank + 1))
            scale = sum(r + 1 for r in range(world))
            assert torch.equal(out.cpu(), (torch.arange(2 * rank, 2 * rank + 2, dtype=torch.float32) * scale)), \
                f"reduce_scatter_tensor: {out}"
            x = base + rank
            dist.broadcast(x, src=world - 1)
            assert torch.equal(x.cpu(), (base + world - 1).cpu()), f"broadcast: {x}"
            dist.barrier()
            backend.synchronize()
        finally:
            dist.destroy_process_group()


def check_collectives(factory: str, world_size: int = 2) -> None:
    """The collectives in ``world_size`` spawned processes (one device each)."""
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_collectives_worker, args=(world_size, factory, _free_port()), nprocs=world_size, join=True)


def _train_losses(out: Path) -> dict[int, float]:
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("split") == "train":
            losses[record["step"]] = record["loss"]
    return losses


def check_training_resume(backend_name: str, tmp_path: Path, config: str = "default", overrides: tuple = (),
                          rtol: float = 0.0, env: dict | None = None) -> dict[str, Any]:
    """3 steps straight vs. 2 steps, a checkpoint and a resumed third step: equal losses (exactly
    on the CPU; ``rtol`` for devices with non-deterministic kernels). Returns the losses."""
    from loongforge.testing import run_cli

    tmp_path = Path(tmp_path)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = [config, f"backend={backend_name}", *TINY_RUN, *overrides]
    run = run_cli("run", *args, "train.steps=3", f"output_dir={straight}", cwd=tmp_path, env=env)
    assert run.returncode == 0, f"the 3-step run on {backend_name} failed:\n{run.stderr[-4000:]}"
    ckpts = straight / "checkpoints"
    assert (ckpts / "step_00000002" / "trainer_state.json").is_file(), "no checkpoint at step 2"
    # the resumed run starts from the step-2 checkpoint of the straight run
    shutil.copytree(ckpts / "step_00000002", resumed / "checkpoints" / "step_00000002")
    (resumed / "checkpoints" / "latest").write_text("step_00000002")
    run = run_cli("run", *args, "train.steps=3", f"output_dir={resumed}", cwd=tmp_path, env=env)
    assert run.returncode == 0, f"the resumed run on {backend_name} failed:\n{run.stderr[-4000:]}"
    a, b = _train_losses(straight), _train_losses(resumed)
    assert set(a) == {1, 2, 3} and 3 in b and 1 not in b, f"steps logged: straight {sorted(a)}, resumed {sorted(b)}"
    assert abs(a[3] - b[3]) <= rtol * abs(a[3]), f"{backend_name}: step 3 loss {a[3]} straight vs {b[3]} resumed"
    return {"straight": a, "resumed": b}


def check_all(factory: str, tmp_path: Path, world_size: int = 2, training: bool = True, **training_kwargs) -> None:
    backend = load_backend(factory)
    check_device(backend)
    check_rng(backend)
    check_memory_stats(backend)
    check_peak_flops(backend)
    check_layer_spec(backend)
    check_collectives(factory, world_size)
    if training:
        check_training_resume(backend.name, tmp_path, **training_kwargs)
