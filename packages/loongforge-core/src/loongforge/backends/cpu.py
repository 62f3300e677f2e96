"""The CPU reference backend: gloo collectives, and megatron-core's CUDA assumptions redirected.

megatron-core allocates with ``device=torch.cuda.current_device()`` and ``device="cuda"`` in many
places (parallel linear layers, DDP buffers, optimizer scalars, grad clipping) and keeps its
dropout RNG states through ``torch.cuda`` calls. Inside :meth:`CpuBackend.activate`:

1. ``_CpuDeviceMode`` (a ``TorchFunctionMode``) rewrites any CUDA ``device=`` argument of a torch
   call to CPU, turns ``Tensor.cuda()`` and ``Tensor.pin_memory()`` into no-ops, drops
   ``pin_memory=True`` (page-locked memory needs a CUDA driver; megatron-core's RoPE slicing for
   context parallelism asks for it) and reports CPU tensors' ``type()`` with the
   ``torch.cuda.`` prefix that megatron-core's optimizers dispatch on;
2. ``torch.cuda.current_device``/``synchronize``/``manual_seed``/``current_stream``/``stream``
   and the ``Stream``/``Event`` classes (megatron-core's all-to-all MoE token dispatcher) are
   replaced by CPU equivalents;
3. megatron-core's RNG tracker is a :class:`CpuRNGStatesTracker` (one CPU generator per name), and
   its get/set of the "CUDA" RNG state (used around activation recompute) use the CPU generator;
4. two collectives megatron-core calls are supplied on gloo groups from ones gloo has had since
   torch 2.2 (:func:`gloo_reduce_scatter`, :func:`gloo_all_reduce`): the list form
   ``torch.distributed.reduce_scatter`` (megatron-core's multimodal context parallelism) and
   ``all_reduce`` with ``ReduceOp.AVG`` (its gradient finalisation and MoE logging). torch 2.6,
   which the package allows, has neither on gloo (both were added in March 2025,
   pytorch/pytorch#149869 and #149781), and gloo's later AVG was reported silently wrong
   (pytorch/pytorch#162338). They replace gloo's own on every torch version, so what the tests
   check is what runs. ``reduce_scatter_tensor``/``all_gather_into_tensor`` (sequence
   parallelism, the distributed optimizer, our context parallelism) need nothing.

5. ``all_to_all_single`` accepts its split sizes as tensors (:func:`cpu_all_to_all_single`):
   megatron-core's MoE all-to-all dispatcher turns them into host arrays only for GPU tensors.

All five are undone when the context exits. ``tests/parallel/test_collectives.py`` checks the
collectives (gloo's and the supplied ones) in two gloo processes; the parity tests next to it
fail when a megatron-core upgrade needs another adaptation.
"""

from __future__ import annotations

import contextlib
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from loongforge.backend import Backend


def _is_cuda(device: Any) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CpuDeviceMode(TorchFunctionMode):
    """Route CUDA allocations and transfers requested by megatron-core to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron-core dispatches on type strings such as "torch.cuda.FloatTensor"
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if _is_cuda(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if kwargs.get("pin_memory"):  # page-locking needs a CUDA driver (e.g. RoPE's CP slicing)
            kwargs = {**kwargs, "pin_memory": False}
        if func in (torch.Tensor.to,) and args[1:] and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


_native_reduce_scatter = dist.reduce_scatter
_native_all_reduce = dist.all_reduce


def _on_gloo(group) -> bool:
    return dist.get_backend(group) == "gloo"


class _ThenWork:
    """An async collective's handle that finishes the supplied op (e.g. the AVG division) on wait."""

    def __init__(self, work, then):
        self._work, self._then, self._done = work, then, False

    def wait(self, timeout=None) -> bool:
        if not self._done:
            self._work.wait() if timeout is None else self._work.wait(timeout)
            self._then()
            self._done = True
        return True

    def is_completed(self) -> bool:
        return self._done


def _finish(work, then, async_op: bool):
    if async_op:
        return _ThenWork(work, then)
    then()
    return None


def gloo_reduce_scatter(output, input_list, op=dist.ReduceOp.SUM, group=None, async_op=False):
    """``torch.distributed.reduce_scatter`` (one input per rank) on gloo: the inputs are laid end
    to end and reduce-scattered with ``reduce_scatter_tensor``; other backends: unchanged."""
    if not _on_gloo(group):
        return _native_reduce_scatter(output, input_list, op=op, group=group, async_op=async_op)
    world = dist.get_world_size(group)
    if len(input_list) != world or any(t.shape != output.shape for t in input_list):
        raise ValueError(f"reduce_scatter needs {world} inputs shaped like the output {tuple(output.shape)}; "
                         f"got {[tuple(t.shape) for t in input_list]}")
    flat = torch.cat([t.reshape(-1) for t in input_list])
    out = torch.empty(output.numel(), dtype=output.dtype, device=output.device)
    average = op == dist.ReduceOp.AVG
    work = dist.reduce_scatter_tensor(out, flat, op=dist.ReduceOp.SUM if average else op, group=group,
                                      async_op=async_op)

    def then():
        output.copy_((out / world if average else out).view_as(output))

    return _finish(work, then, async_op)


def gloo_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
    """``torch.distributed.all_reduce`` with ``ReduceOp.AVG`` on gloo: a sum divided by the group
    size; every other call goes to torch unchanged."""
    if op != dist.ReduceOp.AVG or not _on_gloo(group):
        return _native_all_reduce(tensor, op=op, group=group, async_op=async_op)
    work = _native_all_reduce(tensor, op=dist.ReduceOp.SUM, group=group, async_op=async_op)
    return _finish(work, lambda: tensor.div_(dist.get_world_size(group)), async_op)


_native_all_to_all_single = dist.all_to_all_single


def _split_list(sizes):
    return sizes if sizes is None or isinstance(sizes, list) else [int(n) for n in sizes.tolist()]


def cpu_all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                          async_op=False):
    """``torch.distributed.all_to_all_single`` taking the split sizes as tensors too: megatron-core's
    MoE all-to-all dispatcher computes them as device tensors and moves them to host numpy arrays
    only when they live on a GPU, so on the CPU they reach torch as tensors, which its binding
    rejects. Converted to lists of ints; the collective itself is torch's (gloo has all-to-all)."""
    return _native_all_to_all_single(output, input, _split_list(output_split_sizes), _split_list(input_split_sizes),
                                     group=group, async_op=async_op)


class _HostStream:
    """Stands in for ``torch.cuda.Stream``: on the CPU all work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event if event is not None else _HostEvent()

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _HostEvent:
    """Stands in for ``torch.cuda.Event`` (megatron-core's MoE token dispatcher records some)."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class CpuRNGStatesTracker:
    """megatron-core's RNG-tracker interface (add/fork/get_states/set_states) on CPU generators.

    ``fork(name)`` swaps the global CPU RNG state for the named one, like the CUDA tracker does
    for the CUDA generator, so dropout inside model-parallel regions is reproducible.
    """

    def __init__(self, **_: Any):
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._initialized = False

    def is_initialized(self) -> bool:
        return self._initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_ or name in self.states_:
            raise ValueError(f"RNG state {name!r} or seed {seed} already exists")
        self._initialized = True
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} was never added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


class CpuBackend(Backend):
    name = "cpu"
    collective_backend = "gloo"

    def is_available(self) -> bool:
        return True

    def device(self, local_rank: int = 0) -> torch.device:
        return torch.device("cpu")

    @contextlib.contextmanager
    def activate(self, local_rank: int = 0):
        from megatron.core.tensor_parallel import random as mcore_random

        tracker = CpuRNGStatesTracker()
        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(torch.cuda, "current_device", lambda: "cpu"))
            stack.enter_context(mock.patch.object(torch.cuda, "synchronize", lambda *a, **k: None))
            stack.enter_context(mock.patch.object(torch.cuda, "manual_seed", lambda seed: None))
            stack.enter_context(mock.patch.object(torch.cuda, "current_stream", lambda *a, **k: _HostStream()))
            stack.enter_context(mock.patch.object(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext()))
            # megatron-core's all-to-all MoE dispatcher keeps a side stream for its device-to-host copies
            stack.enter_context(mock.patch.object(torch.cuda, "Stream", _HostStream))
            stack.enter_context(mock.patch.object(torch.cuda, "Event", _HostEvent))
            # activation recompute saves and restores the "CUDA" RNG state around each checkpoint
            stack.enter_context(mock.patch.object(mcore_random, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state()))
            stack.enter_context(mock.patch.object(mcore_random, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state)))
            stack.enter_context(mock.patch.object(mcore_random, "_CUDA_RNG_STATE_TRACKER", tracker))
            stack.enter_context(mock.patch.object(mcore_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True))
            stack.enter_context(mock.patch.object(dist, "reduce_scatter", gloo_reduce_scatter))
            stack.enter_context(mock.patch.object(dist, "all_reduce", gloo_all_reduce))
            stack.enter_context(mock.patch.object(dist, "all_to_all_single", cpu_all_to_all_single))
            stack.enter_context(_CpuDeviceMode())
            yield self

    def manual_seed(self, seed: int) -> None:
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import random as mcore_random

        torch.manual_seed(seed)
        tracker = mcore_random.get_cuda_rng_tracker()
        tracker.reset()
        tp_rank = parallel_state.get_tensor_model_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0
        # the same offsets megatron-core uses, so TP ranks draw different dropout masks
        tracker.add("model-parallel-rng", seed + 2718 + tp_rank)
        tracker.add("data-parallel-rng", seed)
        tracker.add("expert-parallel-rng", seed + 1024 + 100 * 0 + tp_rank)

    def rng_state(self) -> dict[str, Any]:
        from megatron.core.tensor_parallel import random as mcore_random

        return {"cpu": torch.get_rng_state(), "tracker": mcore_random.get_cuda_rng_tracker().get_states()}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        from megatron.core.tensor_parallel import random as mcore_random

        torch.set_rng_state(state["cpu"])
        mcore_random.get_cuda_rng_tracker().set_states(state["tracker"])

    def memory_stats(self) -> dict[str, float]:
        import resource

        # ru_maxrss is KiB on Linux: the process's peak resident memory
        return {"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
