"""Streaming: converting a model of many tensors needs memory for about two of its largest
tensors, not for the model.

A synthetic LLaMA checkpoint (24 layers, 8000-token vocabulary, untied; ~105 MiB of fp32 in 219
tensors, the largest our padded 8064 x 256 embedding / output layer, 7.9 MiB) is converted in a
fresh process whose glibc returns freed large blocks to the OS at once
(``MALLOC_MMAP_THRESHOLD_``), so resident memory follows what the converter holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

MiB = 2**20
#: interpreter, allocator and DCP bookkeeping that does not scale with tensor size
FIXED_OVERHEAD = 24 * MiB


def write_llama(path: Path, *, layers: int, vocab: int, hidden: int = 256, ffn: int = 1024, seed: int = 0) -> dict:
    """A random LLaMA HF directory; returns its size facts."""
    from loongforge_ckpt.safetensors_io import ShardedSafetensorsWriter

    path.mkdir(parents=True)
    heads = 4
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
              "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": heads, "head_dim": hidden // heads, "vocab_size": vocab,
              "max_position_embeddings": 128, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)}
        shapes |= {p + f"self_attn.{x}_proj.weight": (hidden, hidden) for x in "qkvo"}
        shapes |= {p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
                   p + "mlp.down_proj.weight": (hidden, ffn)}
    shapes |= {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}
    writer = ShardedSafetensorsWriter(path, [(n, torch.float32, s) for n, s in shapes.items()], 32 * MiB)
    gen = torch.Generator().manual_seed(seed)
    for n, s in shapes.items():
        writer.write(n, torch.randn(s, generator=gen) * 0.02)
    writer.close()
    return {"tensors": len(shapes), "bytes": writer.total_bytes}


def test_peak_memory_is_about_two_largest_tensors(tmp_path):
    warm = tmp_path / "warm"
    write_llama(warm, layers=1, vocab=300, hidden=64, ffn=128)
    big = tmp_path / "big"
    facts = write_llama(big, layers=24, vocab=8000)
    padded_vocab = 8064  # 8000 rounded up to a multiple of 128
    largest = padded_vocab * 256 * 4
    assert facts["bytes"] > 10 * largest

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).with_name("_memory_worker.py")
    proc = subprocess.run([sys.executable, str(worker), str(warm), str(big), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    to_mcore, to_hf = result["hf_to_mcore"], result["mcore_to_hf"]
    print(f"\nmodel: {facts['tensors']} tensors, {facts['bytes'] / MiB:.1f} MiB; largest tensor {largest / MiB:.2f} MiB"
          f"\nhf-to-mcore: RSS {to_mcore['before'] / MiB:.0f} MiB before, peak +{to_mcore['delta'] / MiB:.1f} MiB"
          f"\nmcore-to-hf: RSS {to_hf['before'] / MiB:.0f} MiB before, peak +{to_hf['delta'] / MiB:.1f} MiB"
          f"\n({result['method']})")
    assert to_mcore["delta"] < 2 * largest + FIXED_OVERHEAD
    # reading back goes one decoder layer (or the embedding / output layer) at a time
    assert to_hf["delta"] < 2 * largest + FIXED_OVERHEAD
