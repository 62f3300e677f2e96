"""Every user error of ``loongforge run`` / ``convert`` is one line on stderr, exit code 2, no
traceback, found before any training process starts (layouts under --nproc-per-node included)."""

from __future__ import annotations

import json

import pytest
from loongforge.testing import run_cli

QWEN3 = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=1024, hidden_size=32,
             intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             tie_word_embeddings=True)


def hf_dir(tmp_path, name: str, weights: bytes | None = None, **config):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({**QWEN3, **config}))
    if weights is not None:
        (path / "model.safetensors").write_bytes(weights)
    return path


def truncated_safetensors() -> bytes:
    header = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]}}).encode()
    return len(header).to_bytes(8, "little") + header + b"\0" * 60  # 128 bytes promised, 60 written


CASES = {
    "unknown model key": (lambda t: ["run", "model.hiden_size=64"],
                          "unknown config key 'model.hiden_size' for the qwen3 family. Did you mean 'hidden_size'"),
    "unknown key": (lambda t: ["run", "train.stepz=3"], "unknown config key 'train.stepz'"),
    "steps 0": (lambda t: ["run", "train.steps=0"], "config key 'train.steps' must be >= 1, got 0"),
    "steps -1": (lambda t: ["run", "train.steps=-1"], "config key 'train.steps' must be >= 1, got -1"),
    "layout under 3 processes": (lambda t: ["run", "--nproc-per-node", "3"],
                                 "global_batch_size"),
    "tp over 3 processes": (lambda t: ["run", "parallel.tp=2", "--nproc-per-node=3"],
                            "world size 3 is not a multiple of parallel.tp x parallel.pp x parallel.cp"),
    "rope yarn": (lambda t: ["run", "model.rope_scaling={rope_type: yarn, factor: 4.0}"],
                  "config key 'model.rope_scaling.rope_type': 'yarn' is not supported"),
    "sliding window": (lambda t: ["run", "model.use_sliding_window=true"],
                       "config key 'model.use_sliding_window': True is not supported"),
    "pretrained missing": (lambda t: ["run", f"model.pretrained={t / 'nowhere'}"], "has no config.json"),
    "pretrained truncated shard": (lambda t: ["run", f"model.pretrained={hf_dir(t, 'cut', truncated_safetensors())}"],
                                   "cannot read it as safetensors"),
    "pretrained yarn": (lambda t: ["run", "model.pretrained=" + str(hf_dir(
        t, 'yarn', b"", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}))],
        "'yarn' is not supported"),
    "convert yarn": (lambda t: ["convert", "hf-to-mcore", str(hf_dir(
        t, 'yarn', b"", rope_scaling={"rope_type": "yarn", "factor": 4.0})), str(t / "out")],
        "'yarn' is not supported"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_error_is_one_line(tmp_path, case):
    make_args, expected = CASES[case]
    args = make_args(tmp_path)
    if args[0] == "run":
        args.append(f"output_dir={tmp_path / 'run'}")
    result = run_cli(*args, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert expected in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
