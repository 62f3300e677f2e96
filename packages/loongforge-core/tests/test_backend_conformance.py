"""The CPU reference backend passes the backend conformance suite (the CUDA backend's GPU tests
and any backend plugin's tests call the same checks)."""

from __future__ import annotations

import pytest
from loongforge import backend_conformance as conformance

CPU = "loongforge.backends.cpu:CpuBackend"


@pytest.fixture(scope="module")
def cpu():
    return conformance.load_backend(CPU)


def test_device(cpu):
    conformance.check_device(cpu)


def test_rng_state_round_trip(cpu):
    conformance.check_rng(cpu)


def test_memory_stats_and_peak_flops(cpu):
    conformance.check_memory_stats(cpu)
    conformance.check_peak_flops(cpu)


def test_layer_spec_builds_a_model(cpu):
    conformance.check_layer_spec(cpu)


@pytest.mark.slow
def test_collectives_in_two_processes():
    conformance.check_collectives(CPU, world_size=2)


@pytest.mark.slow
def test_three_steps_equal_two_steps_and_a_resume(tmp_path):
    losses = conformance.check_training_resume("cpu", tmp_path, env={"LOONGFORGE_LOAD_PLUGINS": "llm"})
    assert losses["straight"][3] == losses["resumed"][3]


def test_a_backend_that_loses_rng_state_fails(cpu, monkeypatch):
    """The suite catches the XPU backend's old defect: no RNG state restore."""
    monkeypatch.setattr(type(cpu), "set_rng_state", lambda self, state: None)
    with pytest.raises(AssertionError, match="does not restore"):
        conformance.check_rng(cpu)
