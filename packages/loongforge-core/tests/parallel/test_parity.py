"""Loss parity of every parallel layout with the single-process run (CPU, fp32, gloo).

For the tiny Qwen3 and Llama-3 layouts (4 layers so that pp x vpp = 4 divides them), 10 training
steps in each layout give the same per-step losses as one process, within 1e-5 relative. Every
run starts from the same HF directory (``model.pretrained``, saved here from a transformers model
built from the shipped tiny config) and trains on the same global batches of the shipped corpus
(packed documents with document masks, so context parallelism runs its masked path too).

Cost on a 2-core machine: the single-process references run once per session; the two-process
layouts of both models run one after the other inside one two-process launch, and the
four-process ones inside one four-process launch (``train_worker.py``: ``loongforge run``'s code
path per run, without re-importing torch and megatron-core for each). One case, Qwen3 with TP=2,
is launched through the real CLI as a two-node job on this machine, the launch that
``docs/parallelism.md`` documents: ``loongforge run CONFIG --nnodes 2 --node-rank {0,1}
--nproc-per-node 1 --master-addr 127.0.0.1 --master-port PORT``, both nodes at once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from loongforge.testing import free_port

STEPS = 10
RTOL = 1e-5
#: family: (size config group, size name, transformers class)
MODELS = {"qwen3": ("qwen3", "qwen3_tiny", "Qwen3ForCausalLM"), "llama": ("llama3", "llama3_tiny", "LlamaForCausalLM")}
TWO_PROCESS = {
    "tp2": ["parallel.tp=2"],
    "pp2": ["parallel.pp=2"],
    "pp2_vpp2": ["parallel.pp=2", "parallel.vpp=2"],
    "dp2": [],
    "dp2_distopt": ["optimizer.distributed=true"],
    "cp2": ["parallel.cp=2"],
    "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
}
FOUR_PROCESS = {
    "tp2_pp2": ["parallel.tp=2", "parallel.pp=2"],
    # sequence parallelism builds a TransformerBlock spec per pipeline stage (modules.layer_spec)
    "tp2_sp_pp2": ["parallel.tp=2", "parallel.sequence_parallel=true", "parallel.pp=2"],
}
CLI_CASE = ("qwen3", "tp2")
RUN_YAML = {
    # seq 32 divides 2 x cp and tp; 4 sequences a step: 2 micro-batches of 2 in one process,
    # one per data-parallel rank at dp=2, and a multiple of pp for the interleaved schedule
    "train": {"steps": STEPS, "seq_length": 32, "micro_batch_size": 2, "global_batch_size": 4},
    "scheduler": {"warmup_steps": 0},
    "logging": {"progress": False, "tensorboard": False, "loss_curve": False},
    "checkpoint": {"save_final": False, "load": None},
}
WORKER = Path(__file__).with_name("train_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """The run config and one HF directory per model (4 layers, the shipped tokenizer's vocab)."""
    import loongforge_llm
    import torch
    import transformers
    from loongforge.data.synthetic_corpus import builtin_corpus_path

    root = tmp_path_factory.mktemp("parallel")
    # the first 300 documents of the shipped corpus (10 steps use ~40 of the ~1,500 packed
    # sequences): every run tokenizes its corpus, and the whole one costs seconds per run
    lines = builtin_corpus_path("tiny_stories").read_text().splitlines()[:300]
    (root / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    sizes = Path(loongforge_llm.__file__).parent / "configs" / "models"
    for family, (group, name, cls) in MODELS.items():
        fields = {k: v for k, v in yaml.safe_load((sizes / group / f"{name}.yaml").read_text()).items()
                  if k != "family"}
        fields.update(num_hidden_layers=4, vocab_size=1024)
        model_cls = getattr(transformers, cls)
        torch.manual_seed(0)
        model_cls(model_cls.config_class(**fields)).float().save_pretrained(root / f"hf_{family}")
    (root / "run.yaml").write_text(yaml.safe_dump({**RUN_YAML, "data": {"paths": [str(root / "corpus.jsonl")]}}))
    return root


def overrides(root: Path, family: str, layout: str, extra: list[str]) -> list[str]:
    return [f"model.pretrained={root / f'hf_{family}'}", f"output_dir={root / family / layout}", *extra]


def launch(root: Path, name: str, nproc: int, runs: list[tuple[str, str, list[str]]]) -> None:
    """Run ``runs`` ([(family, layout, overrides)]) one after the other in one launch of ``nproc``."""
    spec = root / f"{name}.json"
    spec.write_text(json.dumps([{"config": str(root / "run.yaml"), "overrides": overrides(root, f, lay, extra)}
                                for f, lay, extra in runs]))
    command = [sys.executable, str(WORKER), str(spec)]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                   "--master-port", str(free_port()), *command[1:]]
    result = subprocess.run(command, capture_output=True, text=True, cwd=root, env=ENV, timeout=1200)
    assert result.returncode == 0, f"{name} launch failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


@pytest.fixture(scope="session")
def reference(workdir) -> dict[str, list[float]]:
    """Single-process losses per model."""
    launch(workdir, "reference", 1, [(family, "single", []) for family in MODELS])
    return {family: losses(workdir / family / "single") for family in MODELS}


@pytest.fixture(scope="session")
def two_process(workdir) -> Path:
    runs = [(f, lay, extra) for f in MODELS for lay, extra in TWO_PROCESS.items() if (f, lay) != CLI_CASE]
    launch(workdir, "two_process", 2, runs)
    return workdir


@pytest.fixture(scope="session")
def four_process(workdir) -> Path:
    launch(workdir, "four_process", 4, [(f, lay, extra) for f in MODELS for lay, extra in FOUR_PROCESS.items()])
    return workdir


@pytest.fixture(scope="session")
def through_cli(workdir) -> Path:
    """``CLI_CASE`` as a two-node launch of the real CLI (both "nodes" on this machine)."""
    family, layout = CLI_CASE
    port = str(free_port())
    command = [sys.executable, "-m", "loongforge.cli", "run", str(workdir / "run.yaml"),
               *overrides(workdir, family, layout, TWO_PROCESS[layout]),
               "--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port]
    nodes = [subprocess.Popen([*command, "--node-rank", str(rank)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, cwd=workdir, env=ENV) for rank in (0, 1)]
    outputs = [node.communicate(timeout=1200)[0] for node in nodes]
    for rank, (node, output) in enumerate(zip(nodes, outputs, strict=True)):
        assert node.returncode == 0, f"node {rank}:\n{output[-6000:]}"
    return workdir


def check_parity(reference: list[float], got: list[float], case: str) -> None:
    assert len(reference) == len(got) == STEPS, (reference, got)
    worst = max(abs(a - b) / abs(a) for a, b in zip(reference, got, strict=True))
    print(f"{case}: max relative loss difference over {STEPS} steps {worst:.2e}")
    assert worst <= RTOL, f"{case}: single process {reference}\n{' ' * len(case)}  parallel       {got}"


CASES = [pytest.param(f, lay, id=f"{f}-{lay}") for f in MODELS for lay in TWO_PROCESS if (f, lay) != CLI_CASE]


@pytest.mark.parametrize(("family", "layout"), CASES)
def test_two_process_layout_matches_single_process(reference, two_process, family, layout):
    check_parity(reference[family], losses(two_process / family / layout), f"{family} {layout}")


@pytest.mark.parametrize(("family", "layout"), [pytest.param(f, lay, id=f"{f}-{lay}") for f in MODELS
                                                for lay in FOUR_PROCESS])
def test_four_process_layout_matches_single_process(reference, four_process, family, layout):
    check_parity(reference[family], losses(four_process / family / layout), f"{family} {layout}")


def test_two_node_cli_launch_matches_single_process(reference, through_cli):
    family, layout = CLI_CASE
    check_parity(reference[family], losses(through_cli / family / layout), f"{family} {layout} (two-node loongforge run)")
