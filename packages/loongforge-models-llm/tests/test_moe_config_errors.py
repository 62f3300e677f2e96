"""Bad MoE configs are refused before any process group exists, with the key in the message."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from loongforge.config import compose_config
from loongforge.parallel import LayoutError, validate_layout
from loongforge.plugins import get_plugin_manager
from loongforge.trainer.loop import run_pretrain
from loongforge_llm.common.args import ModelConfigError

CASES = [
    (["model.num_experts_per_tok=9"], ModelConfigError, "model.num_experts_per_tok"),
    (["parallel.ep=3"], LayoutError, "parallel.ep=3 does not divide the model's num_experts=8"),
    (["model.moe.capacity=2"], ModelConfigError, "model.moe.capacity"),
    (["model.moe.token_dispatcher=flex"], ModelConfigError, "model.moe.token_dispatcher"),
    (["model.family=qwen3"], ModelConfigError, "the qwen3 family is dense"),
    (["model.mlp_only_layers=[0,1]"], ModelConfigError, "leave no MoE layer"),
]


@pytest.mark.parametrize(("overrides", "error", "message"), CASES)
def test_refused_before_any_process_group(tmp_path, overrides, error, message):
    cfg = compose_config("qwen3_moe_tiny", [f"output_dir={tmp_path}", *overrides])
    with pytest.raises(error, match=message.replace("[", r"\[").replace(".", r"\.")):
        run_pretrain(cfg, get_plugin_manager())
    assert not dist.is_initialized()


def test_dense_model_refuses_expert_parallelism(tmp_path):
    cfg = compose_config("default", ["parallel.ep=2"])
    with pytest.raises(LayoutError, match="parallel.ep=2 / parallel.etp=1 need a mixture-of-experts model"):
        validate_layout(cfg, 2, 4, 4, 2)


@pytest.mark.parametrize(("world", "overrides", "message"), [
    (4, ["parallel.ep=8"], "world size 4 is not a multiple of parallel.ep x parallel.etp x parallel.pp = 8 x 1 x 1"),
    (6, ["parallel.ep=4", "train.global_batch_size=12"], "world size 6 is not a multiple of parallel.ep"),
    (4, ["parallel.ep=2", "parallel.tp=2"], "needs parallel.sequence_parallel=true"),
    (4, ["parallel.etp=0"], "parallel.etp=0 must be >= 1"),
])
def test_expert_layout_checks(world, overrides, message):
    cfg = compose_config("qwen3_moe_tiny", overrides)
    with pytest.raises(LayoutError, match=message.replace(".", r"\.")):
        validate_layout(cfg, world, 2, 4, 2, 8)
    assert not dist.is_initialized()


def test_valid_expert_layouts_pass():
    for world, overrides in [(2, ["parallel.ep=2"]), (4, ["parallel.ep=4"]),
                             (4, ["parallel.ep=2", "parallel.tp=2", "parallel.sequence_parallel=true"]),
                             (4, ["parallel.ep=2", "parallel.pp=2"])]:
        cfg = compose_config("qwen3_moe_tiny", [*overrides, "train.global_batch_size=8", "train.micro_batch_size=1"])
        validate_layout(cfg, world, 2, 4, 2, 8)
