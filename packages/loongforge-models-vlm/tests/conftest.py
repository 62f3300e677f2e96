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



@pytest.fixture
def saved_hf_tensors():
    """``(hf_model, directory) -> tensors``: the model written with ``save_pretrained`` and read
    back, under the names a published checkpoint uses (transformers renames its in-memory modules
    when saving)."""
    from safetensors.torch import load_file

    def save(hf_model, directory) -> dict:
        hf_model.save_pretrained(directory)
        return load_file(f"{directory}/model.safetensors")

    return save
