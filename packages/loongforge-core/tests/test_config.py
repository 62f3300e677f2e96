"""Config composition from plugin search paths, precedence, and errors that name the key."""

from __future__ import annotations

import pytest
from loongforge.config import ConfigError, compose_config
from loongforge.plugins import create_plugin_manager

RUN_YAML = """\
defaults:
  - /models/tiny_gpt@model: tiny_gpt_2l
  - _self_
train:
  steps: 7
  micro_batch_size: 2
model:
  hidden_size: 48
"""


@pytest.fixture
def registry(with_third_party):
    return create_plugin_manager().registry()


@pytest.fixture
def run_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(RUN_YAML)
    return path


def test_compose_merges_plugin_group_file_and_overrides(registry, run_yaml):
    cfg = compose_config(str(run_yaml), ["train.steps=9", "parallel.tp=2"], registry=registry)
    assert cfg.model.family == "tiny_gpt"  # from the plugin's config group
    assert cfg.model.hidden_size == 48  # the file overrides the group
    assert cfg.train.steps == 9  # the command line overrides the file
    assert cfg.train.micro_batch_size == 2
    assert cfg.parallel.tp == 2
    assert cfg.optimizer.lr == pytest.approx(3e-4)  # schema default


def test_unknown_key_is_named_with_suggestion(registry, run_yaml):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz'.*Did you mean 'steps'"):
        compose_config(str(run_yaml), ["+train.stepz=3"], registry=registry)
    run_yaml.write_text(RUN_YAML + "optimiser:\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optimiser'.*Did you mean 'optimizer'"):
        compose_config(str(run_yaml), registry=registry)


def test_wrong_type_names_the_key(registry, run_yaml):
    with pytest.raises(ConfigError, match=r"train.steps"):
        compose_config(str(run_yaml), ["train.steps=many"], registry=registry)


def test_missing_model_config_lists_the_search_path(registry, run_yaml):
    run_yaml.write_text(RUN_YAML.replace("tiny_gpt_2l", "tiny_gpt_9l"))
    with pytest.raises(ConfigError, match=r"tiny_gpt_9l"):
        compose_config(str(run_yaml), registry=registry)


def test_missing_config_file_is_named(registry, tmp_path):
    with pytest.raises(ConfigError, match=r"does-not-exist.yaml"):
        compose_config(str(tmp_path / "does-not-exist.yaml"), registry=registry)


def test_layout_validation_names_the_clashing_numbers(registry, run_yaml):
    from loongforge.parallel import LayoutError, validate_layout

    cfg = compose_config(str(run_yaml), ["parallel.tp=3"], registry=registry)
    with pytest.raises(LayoutError, match=r"world size 4 is not a multiple of .* = 3"):
        validate_layout(cfg, world_size=4)
    cfg = compose_config(str(run_yaml), ["parallel.tp=4"], registry=registry)
    with pytest.raises(LayoutError, match=r"num_attention_heads=6 is not divisible by parallel.tp=4"):
        validate_layout(cfg, world_size=4, num_heads=6)
    cfg = compose_config(str(run_yaml), ["parallel.pp=2", "parallel.vpp=2"], registry=registry)
    with pytest.raises(LayoutError, match=r"num_hidden_layers=6 is not divisible by .* = 2 x 2 = 4"):
        validate_layout(cfg, world_size=2, num_layers=6)
    cfg = compose_config(str(run_yaml), ["train.global_batch_size=6"], registry=registry)
    with pytest.raises(LayoutError, match=r"global_batch_size=6 is not a multiple of .* = 2 x 4 = 8"):
        validate_layout(cfg, world_size=4)
