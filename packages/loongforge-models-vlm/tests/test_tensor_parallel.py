"""Heterogeneous tensor parallelism: the vision encoder and projector stay whole (TP=1, replicated
on every TP rank) while the LLM runs TP=2. Two gloo processes give the losses of one process.

Both runs start from the same weights (an HF-layout safetensors checkpoint made here and loaded
with ``model.pretrained``), so any difference would come from the parallel layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import loongforge_vlm

CONFIG = Path(loongforge_vlm.__file__).parent / "configs" / "qwen2_5_vl_tiny.yaml"
STEPS = 4


def _losses(out_dir: Path) -> list[tuple[float, float]]:
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["grad_norm"]) for r in rows if r["split"] == "train"]


def test_encoder_tp1_llm_tp2_matches_one_process(tmp_path, mcore):
    from loongforge.config import compose_config
    from loongforge.model_provider import RunSettings
    from loongforge.testing import run_cli
    from safetensors.torch import save_file

    from loongforge_vlm.data.shapes import write_shapes
    from loongforge_vlm.provider import VLMProvider

    # qwen3_tiny has 2 KV heads (TP=2 splits them); the Qwen2.5 tiny LLM has one
    config = tmp_path / "vlm.yaml"
    config.write_text(CONFIG.read_text().replace("- /models/qwen2_5@model.foundation: qwen2.5_tiny",
                                                 "- /models/qwen3@model.foundation: qwen3_tiny"))
    data = write_shapes(tmp_path / "shapes", n=32)
    provider = VLMProvider(compose_config(str(config), ["model.foundation.vocab_size=1280"]).model)
    run = RunSettings()
    model = provider.build(provider.transformer_config(run), run, backend=mcore)
    weights = tmp_path / "weights"
    weights.mkdir()
    save_file({k: v.contiguous() for k, v in provider.export_hf_weights(model).items()}, weights / "model.safetensors")
    (weights / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))

    # a vocabulary that needs no padding under TP=1 or 2: the padded logits would enter the softmax
    common = [f"data.paths=[{data}]", f"train.steps={STEPS}", f"model.pretrained={weights}",
              "model.foundation.vocab_size=1280"]
    one = run_cli("run", str(config), f"output_dir={tmp_path / 'one'}", *common, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli("run", str(config), "--nproc-per-node", "2", "parallel.tp=2", f"output_dir={tmp_path / 'two'}",
                  *common, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == STEPS
    for (la, ga), (lb, gb) in zip(a, b):
        assert abs(la - lb) / la < 1e-5 and abs(ga - gb) / ga < 1e-4, (a, b)
    assert a[-1][0] < a[0][0]
