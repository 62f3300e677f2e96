"""Continued pre-training from an HF directory (``model.pretrained``): the trainer's first loss
equals the HF model's loss on the same batch, so the online load is exact."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
import yaml
from loongforge.testing import run_cli


def test_first_loss_equals_hf_loss(tmp_path):
    from pathlib import Path

    import loongforge_llm

    size = Path(loongforge_llm.__file__).parent / "configs/models/qwen3/qwen3_demo.yaml"
    fields = {k: v for k, v in yaml.safe_load(size.read_text()).items() if k != "family"}
    torch.manual_seed(0)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**fields)).float().eval()
    hf.save_pretrained(tmp_path / "hf", safe_serialization=True)

    run = {
        "model": {"pretrained": str(tmp_path / "hf")},
        # HF applies position ids to RoPE but masks causally across documents: match that here
        "data": {"document_attention": False},
        "train": {"steps": 1, "seq_length": 64, "micro_batch_size": 2, "global_batch_size": 4},
        "scheduler": {"warmup_steps": 0},
        "logging": {"progress": False, "tensorboard": False},
        "checkpoint": {"save_final": False},
        "output_dir": str(tmp_path / "out"),
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    result = run_cli("run", str(tmp_path / "run.yaml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ours = json.loads((tmp_path / "out/metrics.jsonl").read_text().splitlines()[0])["loss"]

    # the same first global batch, through the project's own data pipeline (positions restart
    # at each document, so RoPE must follow position_ids)
    from loongforge.data.builder import build_pretrain_dataset
    from loongforge.data.packing import collate
    from loongforge.data.sampler import PretrainingSampler
    from loongforge.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("builtin:tiny_stories")
    train, _ = build_pretrain_dataset({"paths": ["builtin:tiny_stories"]}, tokenizer, seq_length=64, seed=1234)
    sampler = iter(PretrainingSampler(len(train), micro_batch_size=4, global_batch_size=4, seed=1234))
    batch = collate([train[i] for i in next(sampler)])
    with torch.no_grad():
        logits = hf(input_ids=batch["tokens"], position_ids=batch["position_ids"]).logits
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    mask = batch["loss_mask"].flatten().float()
    reference = float((per_token * mask).sum() / mask.sum())
    print(f"trainer first loss {ours:.8f}, HF loss on the same batch {reference:.8f}")
    assert ours == pytest.approx(reference, rel=1e-5)
