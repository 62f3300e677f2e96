"""`loongforge run qwen3_vl_tiny` trains on CPU: DeepStack layers, interleaved MRoPE and the Qwen3 ViT
in the core's training loop, with gradients reaching the DeepStack mergers."""

from __future__ import annotations

import re


def test_qwen3_vl_tiny_trains(tmp_path):
    from loongforge.testing import run_cli

    out = run_cli("run", "qwen3_vl_tiny", f"output_dir={tmp_path}", "train.steps=8", timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "vlm data: 64 conversations with 64 images; 0 skipped" in text
    first, last = map(float, re.search(r"loss: ([\d.]+) \(first step\) -> ([\d.]+) \(step 8\)", text).groups())
    assert last < first - 0.5, (first, last)


def test_qwen3_vl_llm_tp2_matches_one_process(tmp_path):
    """DeepStack layers and interleaved MRoPE under LLM TP=2 with the images split over the two TP
    ranks (2 gloo processes), from the same HF-layout weights as one process: same losses and
    gradient norms over 3 steps."""
    import json

    import torch
    from loongforge.config import compose_config
    from loongforge.testing import run_cli
    from loongforge_vlm.data.shapes import write_shapes
    from loongforge_vlm.provider import VLMProvider
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    common = ["model.foundation.vocab_size=1280", "train.steps=3", "checkpoint.save_final=false"]
    cfg = {k: v for k, v in VLMProvider(compose_config("qwen3_vl_tiny", common).model).hf_config().items()
           if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    Qwen3VLForConditionalGeneration(Qwen3VLConfig(**cfg)).save_pretrained(tmp_path / "weights")
    common += [f"data.paths=[{write_shapes(tmp_path / 'shapes', n=32)}]", f"model.pretrained={tmp_path / 'weights'}"]

    def losses(out):
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["loss"], r["grad_norm"]) for r in rows if r["split"] == "train"]

    one = run_cli("run", "qwen3_vl_tiny", f"output_dir={tmp_path / 'one'}", *common, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli("run", "qwen3_vl_tiny", "--nproc-per-node", "2", "parallel.tp=2", f"output_dir={tmp_path / 'two'}",
                  *common, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    for (la, ga), (lb, gb) in zip(a, b, strict=True):
        assert abs(la - lb) / la < 1e-5 and abs(ga - gb) / ga < 1e-4, (a, b)
