"""Qwen3-MoE checkpoints: HF (per-expert safetensors) -> native -> HF is bit-identical, and a
native checkpoint written by a run under expert parallelism (EP=2, or expert tensor parallelism
ETP=2) converts back to the same HF tensors.

The native checkpoint stores each expert weight whole with global expert indices
(``GroupedExperts.sharded_state_dict``: ``fc1_weight`` [E, 2I, H] with gate rows then up rows,
``fc2_weight`` [E, H, I]); megatron-core's loader gives every EP/ETP rank its slice. The runs load
the converted checkpoint (``checkpoint.load``, weights only), take one optimizer step with
learning rate 0 (weights unchanged) and save under their layout; ``mcore-to-hf`` of that save
must give back the original tensors bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

WORKER = Path(__file__).parents[2] / "loongforge-core" / "tests" / "parallel" / "train_worker.py"
LAYOUTS = {"ep2": ["parallel.ep=2"], "etp2": ["parallel.etp=2"]}


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def moe_hf(tmp_path_factory) -> Path:
    import loongforge_llm
    import transformers

    root = tmp_path_factory.mktemp("moe_ckpt")
    size = Path(loongforge_llm.__file__).parent / "configs" / "models" / "qwen3_moe" / "qwen3_moe_tiny.yaml"
    fields = {k: v for k, v in yaml.safe_load(size.read_text()).items() if k != "family"}
    fields.update(num_hidden_layers=3, mlp_only_layers=[0], vocab_size=1024)  # a dense layer, then two MoE
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**fields)).float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    model.save_pretrained(root / "hf")
    return root


def test_moe_round_trip_is_bit_identical(moe_hf):
    from loongforge_ckpt.hf_to_mcore import convert_hf_to_mcore
    from loongforge_ckpt.mcore_to_hf import convert_mcore_to_hf

    original = tensors(moe_hf / "hf")
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in original
    convert_hf_to_mcore(moe_hf / "hf", moe_hf / "ckpt", log=lambda *_: None)
    convert_mcore_to_hf(moe_hf / "ckpt", moe_hf / "back", max_shard_size="48KB", log=lambda *_: None)
    assert len(list((moe_hf / "back").glob("*.safetensors"))) > 1
    assert_same(original, tensors(moe_hf / "back"))


@pytest.mark.slow
def test_expert_parallel_saves_convert_back(moe_hf):
    from loongforge.data.synthetic_corpus import builtin_corpus_path
    from loongforge.testing import free_port
    from loongforge_ckpt.hf_to_mcore import convert_hf_to_mcore
    from loongforge_ckpt.mcore_to_hf import convert_mcore_to_hf

    root = moe_hf
    if not (root / "ckpt" / "latest").exists():
        convert_hf_to_mcore(root / "hf", root / "ckpt", log=lambda *_: None)
    lines = builtin_corpus_path("tiny_stories").read_text().splitlines()[:100]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    run = {"train": {"steps": 1, "seq_length": 32, "micro_batch_size": 1, "global_batch_size": 2},
           "optimizer": {"lr": 0.0, "min_lr": 0.0}, "scheduler": {"warmup_steps": 0, "type": "constant"},
           "logging": {"progress": False, "tensorboard": False, "loss_curve": False},
           "data": {"paths": [str(root / "corpus.jsonl")]}}
    run["model"] = yaml.safe_load((root / "ckpt" / "config.yaml").read_text())["model"]  # what the converter wrote
    (root / "run.yaml").write_text(yaml.safe_dump(run))
    spec = [{"config": str(root / "run.yaml"),
             "overrides": [f"output_dir={root / name}", f"checkpoint.dir={root / name}",
                           f"checkpoint.load={root / 'ckpt' / 'step_00000000'}", "checkpoint.weights_only=true",
                           *extra]}
            for name, extra in LAYOUTS.items()]
    (root / "runs.json").write_text(json.dumps(spec))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                             str(free_port()), str(WORKER), str(root / "runs.json")], capture_output=True, text=True,
                            cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1200)
    assert result.returncode == 0, result.stderr[-6000:]
    original = tensors(root / "hf")
    for name in LAYOUTS:
        assert (root / name / "latest").read_text() == "step_00000001"
        convert_mcore_to_hf(root / name, root / f"{name}_back", log=lambda *_: None)
        assert_same(original, tensors(root / f"{name}_back"))
