"""Bad inputs fail before anything is written, with a message naming the tensor and the file;
the ``loongforge convert`` CLI reaches both converters (in this process, through ``cli.main``).
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from loongforge_ckpt.errors import ConversionError
from loongforge_ckpt.hf_to_mcore import convert_hf_to_mcore
from loongforge_ckpt.mcore_to_hf import convert_mcore_to_hf

QUIET = {"log": lambda *_: None}


def header(file: Path) -> tuple[int, dict]:
    """(first data byte, header) of a safetensors file, parsed here independently of the package."""
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return 8 + n, json.loads(raw[8:8 + n])


def copy_hf(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_single_file_names_the_cut_tensor(converted, tmp_path):
    hf = copy_hf(converted("qwen3_tiny")["hf"], tmp_path / "hf")
    file = hf / "model.safetensors"
    start, head = header(file)
    size = file.stat().st_size
    cut_at = size - 1000
    with open(file, "r+b") as f:
        f.truncate(cut_at)
    # the tensor whose bytes the new end of file falls inside
    victim = next(n for n, m in head.items() if n != "__metadata__"
                  and start + m["data_offsets"][0] < cut_at < start + m["data_offsets"][1])
    with pytest.raises(ConversionError) as err:
        convert_hf_to_mcore(hf, tmp_path / "out", **QUIET)
    msg = str(err.value)
    print(f"\n{msg}")
    assert str(file) in msg and repr(victim) in msg and "truncated" in msg
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_online_load_of_a_truncated_file_names_file_and_tensor(converted, tmp_path):
    """``model.pretrained=HF_DIR`` (the trainer's online load) on a truncated file."""
    from loongforge.plugins import get_plugin_manager
    from loongforge.trainer.model import build_model_chunks, load_pretrained, model_provider, run_settings
    from loongforge_ckpt.native import megatron_session
    from omegaconf import OmegaConf

    c = converted("qwen3_tiny")
    hf = copy_hf(c["hf"], tmp_path / "hf")
    file = hf / "model.safetensors"
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size - 1000)
    cfg = OmegaConf.load(c["ckpt"] / "config.yaml")
    plugins = get_plugin_manager()
    with megatron_session() as backend:
        provider = model_provider(cfg, plugins)
        chunks = build_model_chunks(provider, run_settings(cfg), backend, plugins)
        with pytest.raises(ValueError, match=rf"{file}: cannot read tensor 'model\.embed_tokens\.weight'.*truncated"):
            load_pretrained(provider, chunks, str(hf))


def test_truncated_shard_of_a_sharded_model(converted, tmp_path):
    hf = copy_hf(converted("llama3_tiny")["back"], tmp_path / "hf")  # several shards + index
    shards = sorted(hf.glob("model-*.safetensors"))
    assert len(shards) > 2
    file = shards[1]
    start, head = header(file)
    tensors = sorted((m["data_offsets"][0], n) for n, m in head.items() if n != "__metadata__")
    first = tensors[len(tensors) // 2]
    with open(file, "r+b") as f:
        f.truncate(start + first[0] + 4)  # 4 bytes into that tensor
    with pytest.raises(ConversionError, match=rf"{file.name} is truncated: tensor {first[1]!r}"):
        convert_hf_to_mcore(hf, tmp_path / "out", **QUIET)
    with open(file, "r+b") as f:
        f.truncate(5)  # not even a header length
    with pytest.raises(ConversionError, match=rf"{file}: not a safetensors file"):
        convert_hf_to_mcore(hf, tmp_path / "out", **QUIET)


def test_shape_mismatch_names_tensor_file_and_both_shapes(converted, tmp_path):
    from safetensors.torch import load_file, save_file

    hf = copy_hf(converted("qwen2_tiny")["hf"], tmp_path / "hf")
    file = hf / "model.safetensors"
    tensors = load_file(str(file))
    name = "model.layers.1.mlp.down_proj.weight"
    good = tuple(tensors[name].shape)
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(ConversionError) as err:
        convert_hf_to_mcore(hf, tmp_path / "out", **QUIET)
    msg = str(err.value)
    print(f"\n{msg}")
    assert repr(name) in msg and str(file) in msg
    assert str((good[0], good[1] - 1)) in msg and str(good) in msg


def test_missing_tensor_and_unmapped_tensor(converted, tmp_path):
    from safetensors.torch import load_file, save_file

    hf = copy_hf(converted("llama2_tiny")["hf"], tmp_path / "hf")
    file = hf / "model.safetensors"
    tensors = load_file(str(file))
    extra = {**tensors, "model.layers.0.self_attn.surprise.weight": torch.zeros(3)}
    save_file(extra, str(file), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="surprise.weight.*--allow-unmapped"):
        convert_hf_to_mcore(hf, tmp_path / "out", **QUIET)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"lacks tensors .*model\.layers\.1\.self_attn\.k_proj\.weight"):
        convert_hf_to_mcore(hf, tmp_path / "out", **QUIET)


def test_pickle_checkpoints_are_never_loaded(converted, tmp_path):
    """A directory with only ``pytorch_model.bin`` is refused without unpickling it."""
    import pickle

    hf = tmp_path / "hf"
    hf.mkdir()
    shutil.copy(converted("qwen3_tiny")["hf"] / "config.json", hf)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (hf / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ConversionError, match="pytorch_model.bin.*pickle checkpoints are not read"):
        convert_hf_to_mcore(hf, tmp_path / "out", **QUIET)
    assert not marker.exists()


def test_layout_the_model_cannot_take_names_the_config_key(converted, tmp_path):
    # qwen3_tiny: 4 query heads, 2 KV heads, 2 layers
    with pytest.raises(ConversionError, match="num_key_value_heads=2 is not divisible by --tp 4"):
        convert_hf_to_mcore(converted("qwen3_tiny")["hf"], tmp_path / "out", tp=4, **QUIET)
    with pytest.raises(ConversionError, match="num_hidden_layers=2 is not divisible by --pp 3"):
        convert_hf_to_mcore(converted("qwen3_tiny")["hf"], tmp_path / "out", pp=3, **QUIET)


def test_interrupted_step_directory_is_refused(converted, tmp_path):
    """A ``step_N.tmp`` left by a killed save is not converted, nor silently replaced by ``latest``."""
    root = tmp_path / "ckpt"
    shutil.copytree(converted("qwen3_tiny")["ckpt"], root)
    partial = root / "step_00000005.tmp"
    shutil.copytree(root / "step_00000000", partial)
    (partial / "trainer_state.json").unlink()
    with pytest.raises(ConversionError, match=rf"{partial} is not a complete checkpoint"):
        convert_mcore_to_hf(partial, tmp_path / "hf", **QUIET)
    (root / "latest").write_text("step_00000005.tmp")
    with pytest.raises(ConversionError, match="not a complete checkpoint"):
        convert_mcore_to_hf(root, tmp_path / "hf", **QUIET)
    assert not (tmp_path / "hf").exists()


def test_cli_converts_both_ways_with_tp_pp_and_copies_the_tokenizer(converted, our_logits, same_tensors, tmp_path,
                                                                     capsys):
    """``loongforge convert hf-to-mcore HF OUT --tp 2 --pp 2`` then ``mcore-to-hf``: same tensors,
    tokenizer files carried through, same logits from our model; errors exit 2 with a message."""
    from loongforge.cli import main
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    c = converted("qwen3_tiny")
    hf = copy_hf(c["hf"], tmp_path / "hf")
    vocab = {f"t{i}": i for i in range(c["model"].config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(hf)

    out, back = tmp_path / "ckpt", tmp_path / "back"
    assert main(["convert", "hf-to-mcore", str(hf), str(out), "--tp", "2", "--pp", "2"]) == 0
    assert main(["convert", "mcore-to-hf", str(out), str(back), "--max-shard-size", "20KB"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and str(back) in printed
    same_tensors(c["hf"], back)
    assert len(list(back.glob("model-*.safetensors"))) > 2
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(header(c["hf"] / "model.safetensors")[1]) - {"__metadata__"}
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / "tokenizer" / name).read_bytes() == (hf / name).read_bytes()
        assert (back / name).read_bytes() == (hf / name).read_bytes()

    logits, vocab_size = our_logits(out, c["ids"])
    rel = ((logits[..., :vocab_size] - c["logits"]).norm() / c["logits"].norm()).item()
    assert rel < 1e-5

    assert main(["convert", "hf-to-mcore", str(hf), str(out)]) == 2  # refuses to overwrite
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert main(["convert", "mcore-to-hf", str(out), str(back)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["convert", "hf-to-mcore", str(hf), str(out), "--force"]) == 0
    assert main(["convert", "mcore-to-hf", str(out), str(back), "--force"]) == 0
    same_tensors(c["hf"], back)
    assert (back / "model.safetensors").is_file() and not (back / "model.safetensors.index.json").exists()


def test_converted_checkpoint_needs_weights_only_to_load(converted):
    """A converted checkpoint has no optimizer state: loading it for a resume says what to set."""
    from loongforge.parallel import wrap_data_parallel
    from loongforge.plugins import get_plugin_manager
    from loongforge.trainer.checkpoint import CheckpointError, load_checkpoint
    from loongforge.trainer.model import build_model_chunks, model_provider, run_settings
    from loongforge.trainer.optim import build_optimizer
    from loongforge_ckpt.native import megatron_session
    from omegaconf import OmegaConf

    root = converted("qwen2_tiny")["ckpt"]
    cfg = OmegaConf.load(root / "config.yaml")
    plugins = get_plugin_manager()
    with megatron_session() as backend:
        chunks = wrap_data_parallel(build_model_chunks(model_provider(cfg, plugins), run_settings(cfg), backend,
                                                       plugins), cfg)
        optimizer = build_optimizer(cfg, chunks, backend)
        with pytest.raises(CheckpointError, match="model weights only .* checkpoint.weights_only=true"):
            load_checkpoint(root / "step_00000000", chunks, optimizer, backend)
        state = load_checkpoint(root / "step_00000000", chunks, None, backend, load_rng=False)
    assert state["weights_only"] is True and state["step"] == 0
