"""``model.image_encoder.parallel``: recompute gives the gradients of a normal backward; an
unsupported encoder TP size or an unknown key fails naming the key. (Encoder TP = LLM TP = 2 in
two processes: ``test_parallel.py``.)"""

from __future__ import annotations

import pytest
import torch
from loongforge.config import ConfigError
from loongforge.model_provider import RunSettings
from loongforge_vlm.data.positions import mrope_positions
from loongforge_vlm.data.shapes import shape_image
from loongforge_vlm.provider import VLMProvider
from omegaconf import open_dict


def encoder_grads(mcore, cfg, recompute: bool) -> dict[str, torch.Tensor]:
    model_cfg = cfg.model.copy()
    with open_dict(model_cfg):
        model_cfg.image_encoder.parallel.recompute = recompute
        model_cfg.image_token_id = 1031
    provider = VLMProvider(model_cfg)
    assert provider.encoder_parallel.recompute is recompute
    run = RunSettings()
    torch.manual_seed(0)
    model = provider.build(provider.transformer_config(run), run, backend=mcore)
    calls = []
    model.image_encoder.register_forward_pre_hook(lambda *_: calls.append(1))
    processor = provider.image_processor()
    pixels, grid = processor(shape_image(56, 84, "red"))
    ids = torch.tensor([[5, 6] + [1031] * processor.num_tokens(grid) + [7, 8]])
    seq = ids.shape[1]
    loss = model(ids, torch.arange(seq)[None], None, labels=ids, pixel_values=pixels, image_grid_thw=torch.tensor([grid]),
                 mrope_position_ids=mrope_positions(ids[0], [grid], 1031, 2)[None]).sum()
    loss.backward()
    assert len(calls) == (2 if recompute else 1)  # recompute: the encoder's forward runs again in backward
    return {n: p.grad.clone() for n, p in model.image_encoder.named_parameters()}


def test_recompute_gives_the_same_gradients(mcore, tiny_cfg):
    plain, recomputed = encoder_grads(mcore, tiny_cfg, False), encoder_grads(mcore, tiny_cfg, True)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("key,value,match", [("tp", 0, r"model.image_encoder.parallel.tp' must be a positive"),
                                             ("pp", 1, r"model.image_encoder.parallel.pp")])
def test_bad_parallel_settings_name_the_key(tiny_cfg, key, value, match):
    model_cfg = tiny_cfg.model.copy()
    with open_dict(model_cfg):
        model_cfg.image_encoder.parallel[key] = value
    with pytest.raises(ConfigError, match=match):
        VLMProvider(model_cfg)


def test_encoder_tp_must_be_one_or_the_llms(mcore, tiny_cfg):
    model_cfg = tiny_cfg.model.copy()
    with open_dict(model_cfg):
        model_cfg.image_encoder.parallel.tp = 2
    provider = VLMProvider(model_cfg)
    run = RunSettings()  # LLM tp=1
    with pytest.raises(ConfigError, match=r"model.image_encoder.parallel.tp' is 2: it must be 1 .* \(1\)"):
        provider.build(provider.transformer_config(run), run, backend=mcore)
