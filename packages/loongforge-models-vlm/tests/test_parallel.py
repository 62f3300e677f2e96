"""Parallel layouts of a VLM give the losses of one process (2 gloo processes each, CPU):

- heterogeneous TP: the vision encoder and projector stay whole (TP=1) while the LLM runs TP=2,
  the two TP ranks each encoding half of the micro-batch's images (encoder data parallelism over the
  TP ranks, the default) or both encoding all of them (``split_images=false``);
- PP=2: the encoder and projector exist on the first pipeline stage only, the LLM's layers are
  split over the two stages;
- encoder TP=2 with LLM TP=2 (``custom_combined``: InternViT x Qwen3): the encoder's heads and MLP
  columns split over the LLM's TP group.

All runs start from the same weights (an HF-layout safetensors checkpoint made here and loaded
with ``model.pretrained``), so any difference would come from the parallel layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import loongforge_vlm
import pytest
import torch

CONFIG = Path(loongforge_vlm.__file__).parent / "configs" / "qwen2_5_vl_tiny.yaml"
STEPS = 4


def _losses(out_dir: Path) -> list[tuple[float, float]]:
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"]) for r in rows if r["split"] == "train"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, mcore):
    """(config, common overrides, losses of one process)."""
    from loongforge.config import compose_config
    from loongforge.model_provider import RunSettings
    from loongforge.testing import run_cli
    from loongforge_vlm.data.shapes import write_shapes
    from loongforge_vlm.provider import VLMProvider
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("parallel")
    # qwen3_tiny has 2 KV heads (TP=2 splits them); the Qwen2.5 tiny LLM has one
    config = tmp / "vlm.yaml"
    config.write_text(CONFIG.read_text().replace("- /models/qwen2_5@model.foundation: qwen2.5_tiny",
                                                 "- /models/qwen3@model.foundation: qwen3_tiny"))
    data = write_shapes(tmp / "shapes", n=32)
    provider = VLMProvider(compose_config(str(config), ["model.foundation.vocab_size=1280"]).model)
    run = RunSettings()
    model = provider.build(provider.transformer_config(run), run, backend=mcore)
    weights = tmp / "weights"
    weights.mkdir()
    save_file({k: v.contiguous() for k, v in provider.export_hf_weights(model).items()}, weights / "model.safetensors")
    (weights / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))

    # a vocabulary that needs no padding under TP=1 or 2: the padded logits would enter the softmax
    common = [f"data.paths=[{data}]", f"train.steps={STEPS}", f"model.pretrained={weights}",
              "model.foundation.vocab_size=1280", "checkpoint.save_final=false"]
    one = run_cli("run", str(config), f"output_dir={tmp / 'one'}", *common, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    losses = _losses(tmp / "one")
    assert len(losses) == STEPS and losses[-1][0] < losses[0][0]
    return config, common, losses, tmp


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.tp=2", "model.image_encoder.parallel.split_images=false"],
                                    ["parallel.pp=2"]], ids=["encoder_tp1_llm_tp2", "encoder_tp1_llm_tp2_replicated", "pp2"])
def test_two_processes_match_one(setup, layout):
    from loongforge.testing import run_cli

    config, common, a, tmp = setup
    out = tmp / "_".join(x.replace("=", "").replace(".", "") for x in layout)
    two = run_cli("run", str(config), "--nproc-per-node", "2", *layout, f"output_dir={out}", *common, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    b = _losses(out)
    assert len(b) == STEPS
    for (la, ga), (lb, gb) in zip(a, b, strict=True):
        assert abs(la - lb) / la < 1e-5 and abs(ga - gb) / ga < 1e-4, (a, b)


def test_vision_parts_only_on_the_first_stage(mcore, tiny_cfg):
    """What the provider builds per pipeline stage: encoder + projector with the embedding."""
    from loongforge.model_provider import RunSettings
    from loongforge_vlm.provider import VLMProvider

    provider = VLMProvider(tiny_cfg.model)
    run = RunSettings()
    first = provider.build(provider.transformer_config(run), run, backend=mcore, post_process=False)
    last = provider.build(provider.transformer_config(run), run, backend=mcore, pre_process=False)
    assert first.image_encoder is not None and first.image_projector is not None
    assert last.image_encoder is None and last.image_projector is None
    assert not any(n.startswith("image_") for n, _ in last.named_parameters())


def test_encoder_tp2_llm_tp2_matches_one_process(tmp_path):
    """Weights: a tiny InternVL checkpoint as transformers' ``save_pretrained`` writes it. The
    2-process run also saves at step 2 (encoder weights and optimizer state split over the TP
    group); one process resumes from it and its step 3 equals the reference's."""
    from loongforge.config import compose_config
    from loongforge.testing import run_cli
    from loongforge_vlm.data.shapes import write_shapes
    from loongforge_vlm.provider import VLMProvider
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    common = ["model.foundation.vocab_size=1280", "train.steps=3", "checkpoint.save_final=false"]
    cfg = dict(VLMProvider(compose_config("custom_combined", common).model).hf_config())
    cfg.pop("architectures"), cfg.pop("model_type")
    torch.manual_seed(0)
    InternVLForConditionalGeneration(InternVLConfig(**cfg)).save_pretrained(tmp_path / "weights")
    data = write_shapes(tmp_path / "shapes", n=32)
    common += [f"data.paths=[{data}]", f"model.pretrained={tmp_path / 'weights'}"]
    one = run_cli("run", "custom_combined", f"output_dir={tmp_path / 'one'}", *common, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli("run", "custom_combined", "--nproc-per-node", "2", "parallel.tp=2", "model.image_encoder.parallel.tp=2",
                  f"output_dir={tmp_path / 'two'}", *common, "checkpoint.save_interval=2", timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    for (la, ga), (lb, gb) in zip(a, b, strict=True):
        assert abs(la - lb) / la < 1e-5 and abs(ga - gb) / ga < 1e-4, (a, b)
    resumed = run_cli("run", "custom_combined", f"output_dir={tmp_path / 'resumed'}", *common,
                      f"checkpoint.load={tmp_path / 'two' / 'checkpoints' / 'step_00000002'}", timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (lc, gc), = _losses(tmp_path / "resumed")
    assert abs(lc - a[2][0]) / a[2][0] < 1e-5 and abs(gc - a[2][1]) / a[2][1] < 1e-4, (a, lc, gc)
