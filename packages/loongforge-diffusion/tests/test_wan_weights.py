"""diffusers <-> ours conversion (bit-identical round trip) and the shipped size configs."""

from pathlib import Path

import loongforge_diffusion
import pytest
import torch
from loongforge.config import ConfigError
from loongforge_diffusion.testing import A14B, TI2V, reference
from loongforge_diffusion.wan.config import WanConfig
from loongforge_diffusion.wan.model import WanDiT
from loongforge_diffusion.wan.weights import (
    DIFFUSERS_WEIGHTS,
    OUR_WEIGHTS,
    diffusers_to_ours,
    load_wan_config,
    ours_to_diffusers,
    weight_mapping,
)
from omegaconf import OmegaConf
from safetensors.torch import load_file

SIZES = Path(loongforge_diffusion.__file__).parent / "configs" / "models" / "wan"


@pytest.mark.parametrize("kwargs,dtype", [(TI2V, torch.float32), (A14B, torch.bfloat16)])
def test_round_trip_is_bit_identical(tmp_path, kwargs, dtype):
    ref = reference(kwargs).to(dtype)
    ref.save_pretrained(tmp_path / "ref")
    diffusers_to_ours(tmp_path / "ref", tmp_path / "ours", expand_timesteps=True)
    ours_to_diffusers(tmp_path / "ours", tmp_path / "back")
    a = load_file(str(tmp_path / "ref" / DIFFUSERS_WEIGHTS))
    b = load_file(str(tmp_path / "back" / DIFFUSERS_WEIGHTS))
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype == dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    assert load_wan_config(tmp_path / "ours").expand_timesteps
    # the written diffusers config builds the same model
    from diffusers import WanTransformer3DModel

    again = WanTransformer3DModel.from_pretrained(tmp_path / "back", torch_dtype=dtype)
    for k, v in again.state_dict().items():
        assert torch.equal(v, a[k]), k


def test_our_file_loads_into_our_model(megatron_cpu, tmp_path):
    ref = reference(A14B)
    ref.save_pretrained(tmp_path / "ref")
    wan = diffusers_to_ours(tmp_path / "ref", tmp_path / "ours")
    model = WanDiT(wan)
    tensors = load_file(str(tmp_path / "ours" / OUR_WEIGHTS))
    assert sorted(tensors) == sorted(n for n, _ in model.named_parameters())
    model.load_state_dict(tensors, strict=True)


def test_tp_shards_merge_back():
    wan = WanConfig.from_diffusers(dict(A14B))
    m = weight_mapping(wan)
    ref = reference(A14B)
    full = m.hf_to_ours(ref.state_dict().__getitem__)
    shards = [m.hf_to_ours(ref.state_dict().__getitem__, r, 2) for r in range(2)]
    assert shards[0]["blocks.0.self_attn.linear_qkv.weight"].shape == (36, 24)
    assert shards[0]["blocks.0.self_attn.linear_proj.weight"].shape == (24, 12)
    assert shards[0]["blocks.0.self_attn.norm_q.weight"].shape == (12,)
    for name, t in full.items():
        assert torch.equal(m.merge_tp(name, [s[name] for s in shards]), t), name


@pytest.mark.parametrize("size,billions", [("wan2.2_ti2v_5b", 5.0), ("wan2.2_t2v_a14b", 14.3)])
def test_size_configs_match_diffusers_parameter_count(size, billions):
    from diffusers import WanTransformer3DModel

    wan = WanConfig.from_section(OmegaConf.load(SIZES / f"{size}.yaml"))
    with torch.device("meta"):
        ref = WanTransformer3DModel(**{k: v for k, v in wan.to_diffusers().items() if not k.startswith("_")})
    n = sum(p.numel() for p in ref.parameters())
    assert abs(n / 1e9 - billions) < 0.1, n
    assert sorted(weight_mapping(wan).hf_names()) == sorted(ref.state_dict().keys())


def test_tiny_size_and_bad_keys():
    wan = WanConfig.from_section(OmegaConf.load(SIZES / "wan_tiny.yaml"))
    assert wan.hidden_size == 48 and wan.rope_dims == (4, 4, 4)
    with pytest.raises(ConfigError, match="model.num_heads"):
        WanConfig.from_section({"family": "wan", "num_heads": 3})
    with pytest.raises(ConfigError, match="model.attention_head_dim"):
        WanConfig(attention_head_dim=13)
