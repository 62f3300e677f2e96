"""Shared fixtures: megatron-core on the CPU backend, the composed tiny VLM config, test images."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def mcore():
    from loongforge.testing import single_process_megatron

    with single_process_megatron() as backend:
        yield backend


@pytest.fixture(scope="module")
def tiny_cfg():
    """The shipped ``qwen2_5_vl_tiny`` run config, composed through the plugins' config dirs."""
    from loongforge.config import compose_config

    return compose_config("qwen2_5_vl_tiny")

