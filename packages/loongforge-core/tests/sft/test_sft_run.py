"""`loongforge run sft_demo` end to end (two data-parallel ranks): LoRA SFT on the shipped tiny chat
set from an HF base model lowers the loss, reports truncation, packing, trainable parameters and the
load balance; `loongforge export-lora` writes a PEFT adapter that `peft` loads onto that base
model, giving the logits of the `--merge` export; `loongforge data convert` works from the CLI."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from unittest import mock

import pytest
import torch
from loongforge.testing import run_cli

llm = pytest.importorskip("loongforge_llm")


def lora_parameter_count(m: dict, rank: int) -> int:
    """rank * (in + out) summed over every layer's qkv, proj, fc1 (gate+up) and fc2."""
    h, i, hd = m["hidden_size"], m["intermediate_size"], m["head_dim"]
    q, kv = m["num_attention_heads"] * hd, m["num_key_value_heads"] * hd
    per_layer = (h + q + 2 * kv) + (q + h) + (h + 2 * i) + (i + h)
    return rank * per_layer * m["num_hidden_layers"]


def test_sft_lora_run_lowers_loss_and_exports(tmp_path):
    """Two data-parallel ranks (load balancing on), LoRA from an HF base model, then export."""
    import peft
    import transformers
    import yaml
    from loongforge.peft.export import export_lora

    size = Path(llm.__file__).parent / "configs/models/qwen3/qwen3_demo.yaml"
    fields = {k: v for k, v in yaml.safe_load(size.read_text()).items() if k != "family"}
    torch.manual_seed(0)
    base = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**fields)).float().eval()
    base.save_pretrained(tmp_path / "base", safe_serialization=True)

    out = tmp_path / "out"
    result = run_cli("run", "--nproc-per-node", "2", "sft_demo", f"output_dir={out}",
                     f"model.pretrained={tmp_path / 'base'}", "train.steps=6", "train.seq_length=128",
                     "train.micro_batch_size=2", "logging.progress=false", "logging.tensorboard=false",
                     "logging.loss_curve=false", cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout
    print(log[-2500:])
    # data report: truncation count and packing efficiency
    data = re.search(r"(\d+) conversations -> (\d+) sequences; (\d+) truncated.*packing efficiency ([\d.]+)%", log)
    assert data and int(data[3]) > 0 and float(data[4]) > 85.0
    # LoRA: exactly the adapters are trainable, and the optimizer holds exactly them
    n_lora = lora_parameter_count(fields, rank=8)
    model = re.search(r"LoRA rank 8 on (\d+) linears\): ([\d,]+) trainable of ([\d,]+) parameters.*"
                      r"optimizer over ([\d,]+) parameters", log)
    assert model, log[-3000:]
    assert int(model[1]) == 4 * fields["num_hidden_layers"]
    assert int(model[2].replace(",", "")) == n_lora == int(model[4].replace(",", ""))
    assert int(model[3].replace(",", "")) > 10 * n_lora
    # data-parallel load balancing over the 2 ranks
    balance = re.search(r"dp load balance: max/mean cost ([\d.]+) \(contiguous split\) -> ([\d.]+)", log)
    assert balance and float(balance[2]) <= float(balance[1])
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    print("losses:", losses)
    assert losses[-1] < losses[0] - 0.1

    ckpts = out / "checkpoints"
    (tmp_path / "base").rename(tmp_path / "base_gone")  # export and generate need the checkpoint alone
    r = run_cli("export-lora", str(ckpts), str(tmp_path / "adapter"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    with mock.patch.dict(os.environ):  # the single-process runtime sets RANK, MASTER_PORT...
        export_lora(str(ckpts), str(tmp_path / "merged"), merge=True)
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

    # `loongforge generate` on the LoRA checkpoint samples with the adapters: greedy = the merged HF model's
    from loongforge.generate import generate_from_checkpoint

    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    prompt = "<|im_start|>user\nWhat does a dog say?<|im_end|>\n<|im_start|>assistant\n"
    with mock.patch.dict(os.environ):
        ours = generate_from_checkpoint(str(ckpts), prompt, max_new_tokens=8)
    enc = tok(prompt, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        ref = merged.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id)
    print(f"generate with adapters: {ours!r}")
    assert ours == tok.decode(ref[0], skip_special_tokens=True)


def test_data_convert_cli(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"instruction": "Say hi", "input": "", "output": "hi"}) + "\n")
    r = run_cli("data", "convert", str(src), str(tmp_path / "b.jsonl"), "--to", "sharegpt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "b.jsonl").read_text()) == {
        "conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]}


def test_lora_run_starts_from_a_native_checkpoint_without_adapters(tmp_path):
    """A full-parameter SFT checkpoint (no adapters) is the base of a LoRA run with
    checkpoint.weights_only; without weights_only the run refuses to resume its optimizer."""
    from loongforge.config import ConfigError, compose_config
    from loongforge.plugins import get_plugin_manager
    from loongforge.trainer.runtime import runtime
    from loongforge.trainer.sft import SFTTrainer

    plugins = get_plugin_manager()
    common = ["train.steps=1", "train.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=2",
              "logging.progress=false", "logging.tensorboard=false", "logging.loss_curve=false"]

    def trainer(rt, *overrides):
        return SFTTrainer(compose_config("sft_demo", [*common, *overrides]), rt)

    cfg = compose_config("sft_demo", [*common, f"output_dir={tmp_path / 'full'}", "peft.lora.rank=0"])
    with mock.patch.dict(os.environ), runtime(cfg, plugins) as rt:
        full = SFTTrainer(cfg, rt)
        full.fit()
        weights = {n: p.detach().clone() for n, p in full.model[0].named_parameters()}
    assert all(p.requires_grad for p in full.model[0].parameters())
    step = tmp_path / "full/checkpoints/step_00000001"

    load = [f"output_dir={tmp_path / 'lora'}", f"checkpoint.load={step}"]
    cfg = compose_config("sft_demo", [*common, *load, "checkpoint.weights_only=true"])
    with mock.patch.dict(os.environ), runtime(cfg, plugins) as rt:
        lora = SFTTrainer(cfg, rt)
        params = dict(lora.model[0].named_parameters())
        assert all(torch.equal(params[n], w) for n, w in weights.items())  # the base: the checkpoint's weights
        trainable = [n for n, p in params.items() if p.requires_grad]
        assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
        assert len(params) == len(weights) + len(trainable)
        assert lora.fit()["last_loss"] > 0
    with mock.patch.dict(os.environ), runtime(cfg, plugins) as rt:
        with pytest.raises(ConfigError, match="checkpoint.weights_only=true"):
            trainer(rt, *load, "checkpoint.weights_only=false")
