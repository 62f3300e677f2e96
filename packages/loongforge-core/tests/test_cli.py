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


def test_run_help_names_the_default_config_launching_and_examples():
    result = run_cli("run", "--help")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "default: 'default'" in out and "--nproc-per-node N" in out
    assert out.count("\n  loongforge run ") == 2  # two examples
    assert "75 stopped by" in out and "SIGTERM/SIGINT after saving a checkpoint" in out


def test_version_lists_every_installed_package():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for name in ("loongforge-core", "loongforge-models-llm", "loongforge-ckpt"):
        assert any(line.startswith(f"{name} ") for line in lines), lines


def test_config_show_says_what_backend_null_resolves_to():
    result = run_cli("config", "show")
    assert result.returncode == 0, result.stderr
    assert "backend: null" in result.stdout
    assert "# backend: null resolves to 'cpu' on this machine" in result.stdout  # no GPU in CI


def test_models_marks_unsupported_families_and_test_sizes():
    result = run_cli("models")
    assert result.returncode == 0, result.stderr
    mimo = next(line for line in result.stdout.splitlines() if line.startswith("│ mimo"))
    assert "UNSUPPORTED" in mimo and "(test only: mimo_tiny)" in mimo
    qwen3 = next(line for line in result.stdout.splitlines() if line.startswith("│ qwen3"))
    assert "│ supported " in qwen3 and "qwen3_0.6b" in qwen3
    assert "(test only: qwen3_tiny)" in result.stdout and "(test only: llama3_tiny)" in result.stdout


def test_progress_to_a_pipe_is_one_plain_line_per_log_interval(tmp_path):
    import re

    result = run_cli("run", "train.steps=4", "train.log_interval=2", "train.seq_length=32", "train.micro_batch_size=2",
                     "train.global_batch_size=2", "train.eval_interval=0", "logging.tensorboard=false",
                     "logging.loss_curve=false", "checkpoint.save_interval=0", f"output_dir={tmp_path / 'out'}",
                     cwd=tmp_path)  # logging.progress is on; stdout is a pipe
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == ["step 2/4", "step 4/4"]
    for line in lines:
        assert re.fullmatch(r"step \d/4 \| loss \d+\.\d{4} \| lr \d\.\d\de-\d\d \| grad norm \d+\.\d{3} \| "
                            r"[\d,]+ tok/s \| peak \d+\.\d\d GiB", line), line
    assert "\x1b[" not in result.stdout and "\r" not in result.stdout  # no terminal control sequences
