"""The Kunlun XPU backend on the CPU, against a stand-in for Kunlun's PyTorch build: a
``torch_xmlir`` module on ``sys.path`` and ``torch.cuda``'s public functions answered by a CPU
generator and counters (the vendor's build presents the device through ``torch.cuda``). What is
tested: detection, selection over the CUDA and CPU backends, the collective backend name, the
environment report, device binding, the megatron-core adaptations (applied inside ``activate()``
and undone after) and the RNG state save/restore through megatron-core's real RNG tracker.
Nothing here runs on Kunlun hardware."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from loongforge.plugins import create_plugin_manager
from loongforge.trainer.runtime import available_backends
from loongforge_xpu import adaptations
from loongforge_xpu.backend import XpuBackend, vendor_installed
from megatron.core.tensor_parallel import random as mcore_random


class StandInCuda:
    """``torch.cuda``'s public API as Kunlun's build would answer it, on the CPU."""

    def __init__(self, devices: int = 2):
        self.devices, self.current, self.synced = devices, 0, 0
        self.generator = torch.Generator()
        self.allocated, self.peak = 3 * 2**30, 5 * 2**30

    def install(self, monkeypatch) -> None:
        gen = self.generator
        funcs = {
            "is_available": lambda: self.devices > 0,
            "device_count": lambda: self.devices,
            "set_device": lambda i: setattr(self, "current", int(i)),
            "current_device": lambda: self.current,
            "get_rng_state": lambda device="cuda": gen.get_state(),
            "set_rng_state": lambda state, device="cuda": gen.set_state(state),
            "manual_seed": lambda seed: gen.manual_seed(seed),
            "manual_seed_all": lambda seed: gen.manual_seed(seed),
            "max_memory_allocated": lambda device=None: self.peak,
            "memory_allocated": lambda device=None: self.allocated,
            "reset_peak_memory_stats": lambda device=None: setattr(self, "peak", self.allocated),
            "synchronize": lambda device=None: setattr(self, "synced", self.synced + 1),
        }
        for name, func in funcs.items():
            monkeypatch.setattr(torch.cuda, name, func)
        monkeypatch.setattr(torch.cuda.random, "get_rng_state", funcs["get_rng_state"])

    def draw(self) -> torch.Tensor:
        """A draw from the device generator (what dropout on the device would consume)."""
        return torch.rand(4, generator=self.generator)


@pytest.fixture
def kunlun(tmp_path, monkeypatch) -> StandInCuda:
    """Kunlun's PyTorch build, stood in for: ``torch_xmlir`` importable, ``torch.cuda`` answered."""
    (tmp_path / "torch_xmlir.py").write_text('"""stand-in for Kunlun\'s PyTorch extension"""\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    standin = StandInCuda()
    standin.install(monkeypatch)
    return standin


def test_not_detected_without_the_vendor_build(monkeypatch):
    StandInCuda().install(monkeypatch)  # a CUDA device, but no torch_xmlir: an NVIDIA machine
    assert not vendor_installed()
    assert not XpuBackend().is_available()


def test_detected_with_the_vendor_build(kunlun):
    assert vendor_installed() and XpuBackend().is_available()
    kunlun.devices = 0
    assert not XpuBackend().is_available()


def test_selected_over_cuda_and_cpu(kunlun, monkeypatch):
    """Kunlun's torch.cuda makes the CUDA backend available too: the XPU backend must win."""
    monkeypatch.setenv("LOONGFORGE_LOAD_PLUGINS", "cuda,xpu")
    pm = create_plugin_manager()
    available = available_backends(pm.registry())
    assert {b.name for b in available} == {"cpu", "cuda", "xpu"}
    chosen = pm.hook.loongforge_select_backend(available=available, requested=None)
    assert chosen.name == "xpu"
    assert pm.hook.loongforge_select_backend(available=available, requested="cpu").name == "cpu"


def test_collective_backend_is_bkcl_when_registered(monkeypatch):
    assert XpuBackend().collective_backend == "nccl"  # CUDA-compatible builds route nccl to BKCL
    monkeypatch.setattr(dist.Backend, "backend_list", [*dist.Backend.backend_list, "bkcl"])
    assert XpuBackend().collective_backend == "bkcl"


def test_environment_reports_devices_and_bkcl(monkeypatch):
    monkeypatch.setenv("XPU_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("BKCL_PCIE_RING", "1")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    env = XpuBackend().environment()
    assert env["XPU_VISIBLE_DEVICES"] == "0,1" and env["BKCL_PCIE_RING"] == "1" and "NCCL_DEBUG" not in env


def test_activate_binds_the_device_and_undoes_its_adaptations(kunlun, monkeypatch):
    originals = {name: getattr(mcore_random, name) for _, name in adaptations.ADAPTATIONS}
    backend = XpuBackend()
    with backend.activate(1):
        assert kunlun.current == 1 and backend.device(1) == torch.device("cuda", 1)
        for (_, name), replacement in adaptations.ADAPTATIONS.items():
            assert getattr(mcore_random, name) is replacement
    assert {name: getattr(mcore_random, name) for name in originals} == originals
    monkeypatch.setenv("XPU_VISIBLE_DEVICES", "0,1")
    with pytest.raises(RuntimeError, match=r"local rank 2 .* 2 are visible .*XPU_VISIBLE_DEVICES"):
        with backend.activate(2):
            pass


def test_rng_state_round_trip_through_megatron_tracker(kunlun):
    backend = XpuBackend()
    with backend.activate(0):
        backend.manual_seed(1234)
        tracker = mcore_random.get_cuda_rng_tracker()
        assert {"model-parallel-rng", "data-parallel-rng"} <= set(tracker.get_states())
        state = backend.rng_state()
        assert all(isinstance(v, torch.Tensor) for v in (state["cpu"], state["device"], *state["tracker"].values()))

        def draws():
            out = [torch.rand(4), kunlun.draw()]
            with tracker.fork():  # dropout inside a tensor-parallel region: the named stream
                out.append(kunlun.draw())
            out.append(kunlun.draw())  # the default stream continues where it was before the fork
            return out

        first = draws()
        backend.set_rng_state(state)
        again = draws()
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
        assert not torch.equal(first[1], first[2])  # the fork draws from its own stream
        backend.manual_seed(4321)
        assert not torch.equal(draws()[1], first[1])


def test_memory_stats_and_peak_flops(kunlun):
    backend = XpuBackend()
    assert backend.memory_stats() == {"peak_gib": 5.0, "allocated_gib": 3.0}
    backend.reset_peak_memory()
    assert backend.memory_stats()["peak_gib"] == 3.0
    backend.synchronize()
    assert kunlun.synced == 1
    assert backend.peak_flops("bf16") is None  # no citable datasheet figure


def test_adaptations_fail_loudly_when_megatron_changes(monkeypatch):
    monkeypatch.delattr(mcore_random, "_set_cuda_rng_state")
    with pytest.raises(RuntimeError, match="_set_cuda_rng_state"):
        with adaptations.applied():
            pass
