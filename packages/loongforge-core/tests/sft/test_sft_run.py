"""`loongforge run sft_demo` end to end: LoRA SFT on the shipped tiny chat set from an HF base model
lowers the loss; `loongforge export-lora` writes a PEFT adapter that `peft` loads onto that base
model, giving the logits of the `--merge` export; `loongforge data convert` works from the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loongforge.testing import run_cli

llm = pytest.importorskip("loongforge_llm")


def test_sft_lora_run_lowers_loss_and_exports(tmp_path):
    import peft
    import transformers
    import yaml

    size = Path(llm.__file__).parent / "configs/models/qwen3/qwen3_demo.yaml"
    fields = {k: v for k, v in yaml.safe_load(size.read_text()).items() if k != "family"}
    torch.manual_seed(0)
    base = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**fields)).float().eval()
    base.save_pretrained(tmp_path / "base", safe_serialization=True)

    out = tmp_path / "out"
    result = run_cli("run", "sft_demo", f"output_dir={out}", f"model.pretrained={tmp_path / 'base'}",
                     "train.steps=6", "train.seq_length=128", "logging.progress=false",
                     "logging.tensorboard=false", "logging.loss_curve=false", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    print(result.stdout[-1500:])
    assert "truncated to seq_length" in result.stdout and "packing efficiency" in result.stdout
    assert "LoRA rank 8 on 16 linears" in result.stdout and "trainable of" in result.stdout
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    print("losses:", losses)
    assert losses[-1] < losses[0] - 0.1

    ckpts = out / "checkpoints"
    r1 = run_cli("export-lora", str(ckpts), str(tmp_path / "adapter"), cwd=tmp_path)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run_cli("export-lora", str(ckpts), str(tmp_path / "merged"), "--merge", cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    cfg = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["base_model_name_or_path"] == str(tmp_path / "base")

    ids = torch.randint(0, fields["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    adapted = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        a, m = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        with adapted.disable_adapter():
            b = adapted(input_ids=ids).logits
    err, effect = ((a - m).norm() / m.norm()).item(), ((a - b).norm() / b.norm()).item()
    print(f"peft adapter vs merged export: rel err {err:.2e}; adapter changes logits by {effect:.2e}")
    assert effect > 1e-4 and err < 1e-5


def test_data_convert_cli(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}) + "\n")
    r = run_cli("data", "convert", str(src), str(tmp_path / "b.jsonl"), "--to", "sharegpt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "b.jsonl").read_text()) == {
        "conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]}
