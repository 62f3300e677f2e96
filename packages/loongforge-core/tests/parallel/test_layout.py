"""Impossible parallel layouts are refused before any process group exists, naming the numbers."""

from __future__ import annotations

import pytest
from loongforge.parallel import LayoutError, validate_layout
from omegaconf import OmegaConf


def config(**parallel):
    train = {"seq_length": parallel.pop("seq_length", 32), "micro_batch_size": parallel.pop("mbs", 2),
             "global_batch_size": parallel.pop("gbs", 8)}
    return OmegaConf.create({"parallel": {"tp": 1, "pp": 1, "vpp": None, "cp": 1, "sequence_parallel": False,
                                          **parallel}, "train": train})


# model: 4 layers, 4 heads, 2 KV heads (the tiny Qwen3/Llama shapes of the parity tests)
MODEL = {"num_layers": 4, "num_heads": 4, "num_kv_heads": 2}


@pytest.mark.parametrize(
    ("world", "parallel", "message"),
    [
        (3, {"tp": 2}, "world size 3 is not a multiple of parallel.tp x parallel.pp x parallel.cp = 2 x 1 x 1 = 2"),
        (4, {"tp": 2, "pp": 2, "cp": 2}, "world size 4 is not a multiple of parallel.tp x parallel.pp x parallel.cp "
                                         "= 2 x 2 x 2 = 8"),
        (3, {"tp": 3}, "model num_attention_heads=4 is not divisible by parallel.tp=3"),
        (4, {"tp": 4}, "model num_key_value_heads=2 is not divisible by parallel.tp=4"),
        (3, {"pp": 3}, "model num_hidden_layers=4 is not divisible by parallel.pp x parallel.vpp = 3 x 1 = 3"),
        (2, {"pp": 2, "vpp": 3}, "model num_hidden_layers=4 is not divisible by parallel.pp x parallel.vpp = 2 x 3 = 6"),
        (1, {"vpp": 2}, "parallel.vpp=2 needs parallel.pp >= 2 (got 1)"),
        (2, {"pp": 2, "vpp": 2, "gbs": 6}, "= 6 / (2 x 1) = 3, to be a multiple of parallel.pp=2"),
        (2, {"gbs": 6}, "train.global_batch_size=6 is not a multiple of train.micro_batch_size x data-parallel "
                        "size = 2 x 2 = 4"),
        (2, {"cp": 2, "seq_length": 30}, "train.seq_length=30 is not divisible by 2 x parallel.cp = 4"),
        (4, {"tp": 4, "sequence_parallel": True, "seq_length": 30, "num_heads": 8, "num_kv_heads": 4},
         "train.seq_length=30 is not divisible by parallel.tp x parallel.cp = 4 x 1"),
        (1, {"sequence_parallel": True}, "parallel.sequence_parallel=true needs parallel.tp >= 2"),
        (2, {"tp": 0}, "parallel.tp=0 must be >= 1"),
    ],
)
def test_impossible_layout_names_the_clashing_numbers(world, parallel, message):
    model = {key: parallel.pop(key, value) for key, value in MODEL.items()}
    with pytest.raises(LayoutError) as info:
        validate_layout(config(**parallel), world, **model)
    print(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("world", "parallel", "dp", "microbatches"),
    [(2, {"tp": 2}, 1, 4), (2, {}, 2, 2), (2, {"pp": 2, "vpp": 2}, 1, 4), (4, {"tp": 2, "pp": 2}, 1, 4),
     (8, {"tp": 2, "cp": 2, "sequence_parallel": True}, 2, 2)],
)
def test_possible_layout_derives_data_parallel_size(world, parallel, dp, microbatches):
    layout = validate_layout(config(**parallel), world, **MODEL)
    assert (layout.dp, layout.num_microbatches) == (dp, microbatches)
