"""HF -> native -> HF conversion: bit-identical round trips and logits parity under TP/PP.

Every supported family layout (the shipped ``*_tiny`` configs) is built as a random transformers
model, saved with safetensors, converted with ``hf-to-mcore`` and back with ``mcore-to-hf``
(several output shards). Our megatron-core model loaded from the native checkpoint with the
trainer's own code must reproduce the HF fp32 logits at TP=1 here, and at TP=2 and PP=2 in a
2-process gloo world, whose re-saved checkpoints (written under that layout) must convert back
to the original tensors bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REL_TOL = 1e-5
#: the shipped tiny config of every supported layout (conftest.FAMILIES)
NAMES = ["llama2_tiny", "llama3_tiny", "qwen1.5_tiny", "qwen2_tiny", "qwen2.5_tiny", "qwen3_tiny"]


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_bit_identical(converted, same_tensors, name):
    c = converted(name)
    assert (c["ckpt"] / "latest").read_text() == "step_00000000"
    state = json.loads((c["ckpt"] / "step_00000000" / "trainer_state.json").read_text())
    assert state["step"] == 0 and state["weights_only"] is True
    assert (c["ckpt"] / "config.yaml").is_file()
    shards = sorted(p.name for p in c["back"].glob("*.safetensors"))
    assert len(shards) > 1 and (c["back"] / "model.safetensors.index.json").is_file(), shards
    same_tensors(c["hf"], c["back"])

    import transformers

    orig = transformers.AutoConfig.from_pretrained(c["hf"]).to_dict()
    back = transformers.AutoConfig.from_pretrained(c["back"]).to_dict()
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "tie_word_embeddings",
                "rope_parameters", "rope_scaling", "rope_theta", "attention_bias", "max_position_embeddings"):
        assert back.get(key) == orig.get(key), key


def test_bf16_round_trip_keeps_dtype_and_bits(converted, same_tensors, tmp_path):
    """A bf16 checkpoint stays bf16 in ours (no fp32 detour) and comes back bit for bit."""
    import copy

    import transformers
    from loongforge_ckpt.hf_to_mcore import convert_hf_to_mcore
    from loongforge_ckpt.mcore_to_hf import convert_mcore_to_hf
    from loongforge_ckpt.native import stored_dtypes

    model = copy.deepcopy(converted("qwen3_tiny")["model"]).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True)
    step = convert_hf_to_mcore(tmp_path / "hf", tmp_path / "ckpt", log=lambda *_: None)
    assert set(stored_dtypes(step).values()) == {torch.bfloat16}
    convert_mcore_to_hf(tmp_path / "ckpt", tmp_path / "back", log=lambda *_: None)
    same_tensors(tmp_path / "hf", tmp_path / "back")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "back").dtype == torch.bfloat16

    # loaded into an fp32 training model and saved again: the export is float32, values unchanged
    from loongforge.plugins import get_plugin_manager
    from loongforge.trainer.checkpoint import load_checkpoint, save_checkpoint
    from loongforge.trainer.model import build_model_chunks, model_provider, run_settings
    from loongforge_ckpt.native import megatron_session
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(tmp_path / "ckpt" / "config.yaml")
    plugins = get_plugin_manager()
    with megatron_session() as backend:
        chunks = build_model_chunks(model_provider(cfg, plugins), run_settings(cfg), backend, plugins)
        load_checkpoint(step, chunks, None, backend, load_rng=False)
        save_checkpoint(tmp_path / "ckpt", 1, chunks, None, {"step": 1}, backend)
    convert_mcore_to_hf(tmp_path / "ckpt", tmp_path / "fp32", log=lambda *_: None)
    config = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert config["torch_dtype"] == config.get("dtype", "float32") == "float32"
    from safetensors.torch import load_file

    ref, up = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "fp32" / "model.safetensors"))
    assert all(up[n].dtype == torch.float32 and torch.equal(up[n], t.float()) for n, t in ref.items())


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_hf_at_tp1(converted, our_logits, name):
    c = converted(name)
    logits, vocab = our_logits(c["ckpt"], c["ids"])
    assert logits.shape[-1] > vocab  # padded vocabulary rows exist and are ignored
    ref = c["logits"]
    rel = ((logits[..., :vocab] - ref).norm() / ref.norm()).item()
    print(f"\n{name} TP=1: |ours - hf| / |hf| = {rel:.2e}")
    assert rel < REL_TOL

    # the exported directory is a normal HF model with the original's logits
    import transformers

    back = transformers.AutoModelForCausalLM.from_pretrained(c["back"], dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(back(c["ids"]).logits, ref)


@pytest.mark.slow
def test_logits_under_tp2_and_pp2_and_resaved_layouts_convert_back(converted, same_tensors, tmp_path):
    """One torchrun launch, 2 CPU processes: llama2 (untied) and qwen3 (tied) at TP=2 and PP=2."""
    from loongforge.testing import free_port
    from loongforge_ckpt.mcore_to_hf import convert_mcore_to_hf

    cases = []
    for name in ("llama2_tiny", "qwen3_tiny"):
        c = converted(name)
        for tp, pp in ((2, 1), (1, 2)):
            cases.append({"name": name, "tp": tp, "pp": pp, "ckpt": str(c["ckpt"]), "ref": str(c["reference"]),
                          "resave": str(tmp_path / f"{name}_tp{tp}_pp{pp}")})
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"cases": cases, "out": str(tmp_path / "results.json")}))
    worker = Path(__file__).with_name("_dist_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(free_port()), str(worker), str(spec)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == len(cases)
    for r in results:
        print(f"\n{r['name']} TP={r['tp']} PP={r['pp']}: |ours - hf| / |hf| = {r['rel']:.2e} "
              f"(padded vocab {r['padded_vocab']})")
        assert r["rel"] < REL_TOL, r
    # checkpoints saved by the trainer under TP=2 / PP=2 convert back to the original tensors
    for case in cases:
        out = tmp_path / f"{Path(case['resave']).name}_hf"
        convert_mcore_to_hf(case["resave"], out, max_shard_size="1MB", log=lambda *_: None)
        same_tensors(converted(case["name"])["hf"], out)

