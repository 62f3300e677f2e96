"""Fixtures of the embodied tests.

``lerobot_pi05``: build lerobot's Pi0.5 network (``PI05Pytorch``) at the tiny test size, without downloads.

lerobot hard-codes PaliGemma's full-size SigLIP (1152 wide, 27 layers) and a 2048-wide projector
in ``PaliGemmaWithExpertModel``; the builder hands it a tiny PaliGemma config through the module's
``CONFIG_MAPPING`` name for the duration of the construction (pytest ``monkeypatch``, undone
after the test) and the Gemma sizes through ``get_gemma_config``. The forward code is lerobot's.
"""

from __future__ import annotations

import pytest
import torch
from loongforge_embodied.pi05.config import PiConfig


def build_pi05(c: PiConfig, monkeypatch):
    from lerobot.policies.pi05 import modeling_pi05 as m
    from lerobot.policies.pi05.configuration_pi05 import PI05Config
    from transformers import GemmaConfig, PaliGemmaConfig

    v = c.vision
    sizes = {"vlm": c.vlm, "expert": c.expert}
    order = iter(["vlm", "expert"])

    def gemma(variant):
        s = sizes[next(order)]
        return m.GemmaConfig(width=s.width, depth=s.depth, mlp_dim=s.mlp_dim, num_heads=s.num_heads,
                             num_kv_heads=s.num_kv_heads, head_dim=s.head_dim)

    def paligemma():
        cfg = PaliGemmaConfig(
            vision_config=dict(model_type="siglip_vision_model", hidden_size=v.hidden_size,
                               intermediate_size=v.intermediate_size, num_hidden_layers=v.depth,
                               num_attention_heads=v.num_heads, patch_size=v.patch_size, image_size=v.image_size,
                               vision_use_head=False))
        return cfg

    mapping = {"paligemma": paligemma, "gemma": GemmaConfig}
    monkeypatch.setattr(m, "CONFIG_MAPPING", mapping)
    monkeypatch.setattr(m, "get_gemma_config", gemma)
    pc = PI05Config(chunk_size=c.chunk_size, n_action_steps=c.chunk_size, max_state_dim=c.max_state_dim,
                    max_action_dim=c.max_action_dim, image_resolution=(v.image_size, v.image_size), dtype="float32")
    ref = m.PI05Pytorch(pc)
    return ref


def fix_projector(ref, c: PiConfig):
    """lerobot sets ``projection_dim=2048`` (the real Gemma-2B width) on the vision config; at the
    tiny width the projector must map to ``c.vlm.width``: rebuild it with the same class."""
    from transformers.models.paligemma.modeling_paligemma import PaliGemmaMultiModalProjector

    pg = ref.paligemma_with_expert.paligemma
    cfg = pg.config
    cfg.vision_config.projection_dim = c.vlm.width
    pg.model.multi_modal_projector = PaliGemmaMultiModalProjector(cfg)
    return ref


def randomize(module, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture
def lerobot_pi05(monkeypatch):
    """-> build(c: PiConfig) -> lerobot ``PI05Pytorch`` at that size with random weights."""
    def build(c: PiConfig):
        ref = fix_projector(build_pi05(c, monkeypatch), c).eval()
        randomize(ref)
        return ref
    return build
