"""The README's start from HF weights: ``loongforge run model.pretrained=HF_DIR`` with the default
config (and with the SFT example) takes the architecture from the HF ``config.json``; the default
config's demo sizes (hidden 128, 4 layers) do not override it. A size the user sets that disagrees
is refused by name."""

from __future__ import annotations

import pytest
import torch
import transformers
from loongforge.testing import run_cli
from omegaconf import OmegaConf

#: differs from the default config's qwen3_demo size in every dimension but the vocabulary
TINY = dict(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "qwen3"
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY)).save_pretrained(path, safe_serialization=True)
    return path


def test_config_show_takes_the_sizes_from_config_json(hf_dir, tmp_path):
    result = run_cli("config", "show", f"model.pretrained={hf_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    model = OmegaConf.create(result.stdout).model
    assert (model.family, model.hidden_size, model.num_hidden_layers, model.head_dim) == ("qwen3", 32, 2, 16)


def test_an_explicit_size_that_disagrees_is_refused(hf_dir, tmp_path):
    result = run_cli("run", f"model.pretrained={hf_dir}", "model.hidden_size=64", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip() == (
        f"error: config key 'model.hidden_size' is 64 (set on the command line) but {hf_dir}/config.json has "
        "hidden_size=32: with model.pretrained the architecture comes from the config.json; remove model.hidden_size")
    # one that agrees is fine
    same = run_cli("config", "show", f"model.pretrained={hf_dir}", "model.hidden_size=32", cwd=tmp_path)
    assert same.returncode == 0, same.stderr[-3000:]


@pytest.mark.parametrize("config", ["default", "sft_demo"])
def test_two_steps_from_hf_weights_with_a_shipped_config(hf_dir, tmp_path, config):
    out = tmp_path / "out"
    result = run_cli("run", config, f"model.pretrained={hf_dir}", "train.steps=2", "train.eval_interval=0",
                     "train.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=2",
                     "logging.progress=false", "logging.tensorboard=false", "logging.loss_curve=false",
                     f"output_dir={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = OmegaConf.load(out / "checkpoints" / "config.yaml").model
    assert (saved.hidden_size, saved.num_hidden_layers, saved.intermediate_size) == (32, 2, 64)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
