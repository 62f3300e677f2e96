"""Shared fixtures: the shipped size configs and megatron-core on the CPU backend."""

from __future__ import annotations

from pathlib import Path

import loongforge_llm
import pytest

CONFIGS = Path(loongforge_llm.__file__).parent / "configs" / "models"


def pytest_report_header(config):
    return f"loongforge_llm configs: {CONFIGS}"


@pytest.fixture(scope="module")
def mcore():
    """megatron-core in one gloo process with the CPU backend, shared by a test module."""
    from loongforge.testing import single_process_megatron

    with single_process_megatron() as backend:
        yield backend


@pytest.fixture
def load_size():
    """``load_size("qwen3", "qwen3_tiny")`` -> the OmegaConf node of a shipped size."""
    from omegaconf import OmegaConf

    def load(group: str, name: str):
        return OmegaConf.load(CONFIGS / group / f"{name}.yaml")

    return load
