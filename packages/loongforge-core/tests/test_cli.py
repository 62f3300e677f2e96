"""The CLI's listing, config and data commands, as a user runs them."""

from __future__ import annotations

import json

from loongforge.testing import run_cli


def test_config_show_prints_the_composed_config():
    result = run_cli("config", "show", "train.steps=7", "parallel.tp=2")
    assert result.returncode == 0, result.stderr
    assert "steps: 7" in result.stdout and "tp: 2" in result.stdout
    assert "family: qwen3" in result.stdout  # the default config's model group


def test_config_show_names_unknown_keys():
    result = run_cli("config", "show", "optimizer.learning_rate=1")
    assert result.returncode == 2
    assert "unknown config key 'optimizer.learning_rate'" in result.stderr
    assert "Traceback" not in result.stderr


def test_models_lists_families_and_configs():
    result = run_cli("models")
    assert result.returncode == 0, result.stderr
    for expected in ("qwen3", "llama", "qwen3_0.6b", "llama3.2_1b", "qwen2.5_7b"):
        assert expected in result.stdout


def test_preprocess_then_train_on_indexed_data(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"body": f"Tom had a red ball number {i}. He was happy."}) + "\n"
                            for i in range(200)))
    result = run_cli("data", "preprocess", "--input", str(docs), "--output-prefix", str(tmp_path / "idx/docs"),
                     "--tokenizer", "builtin:tiny_stories", "--text-field", "body", "--workers", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "idx/docs.bin").stat().st_size > 0 and (tmp_path / "idx/docs.idx").is_file()
    run = run_cli("run", "data.format=indexed", f"data.paths=[{tmp_path / 'idx/docs'}]", "data.valid_fraction=0",
                  "train.steps=3", "train.seq_length=32", "train.eval_interval=0", "logging.progress=false",
                  f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [json.loads(x)["loss"] for x in (tmp_path / "out/metrics.jsonl").read_text().splitlines()]
    assert len(losses) >= 1 and all(loss > 0 for loss in losses)
