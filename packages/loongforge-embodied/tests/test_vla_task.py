"""``loongforge run pi05_tiny`` through the core's trainer (task contract): the loss falls,
``loongforge generate`` returns an action chunk from the checkpoint, the fine-tuning modes freeze
what they say, bf16 runs, and 2-process data parallelism (+ distributed optimizer, gloo) gives
the loss of one process."""

from __future__ import annotations

import json

import pytest
from loongforge.testing import run_cli

SMALL = ["train.micro_batch_size=4", "train.global_batch_size=8", "train.log_interval=1",
         "vla.model.chunk_size=6"]


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train(tmp_path, name, *overrides, nproc=None):
    out = tmp_path / name
    launch = ["--nproc-per-node", str(nproc)] if nproc else []
    r = run_cli("run", "pi05_tiny", f"output_dir={out}", "vla.data_root=" + str(tmp_path / "reaching"), *SMALL,
                *overrides, *launch, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, r


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from loongforge_embodied.data.synthetic import write_reaching_dataset

    tmp = tmp_path_factory.mktemp("vla")
    write_reaching_dataset(tmp / "reaching", episodes=4, length=20)
    return tmp


def test_pi05_tiny_trains_and_generates(data):
    out, r = train(data, "run", "train.steps=12", "optimizer.lr=3e-3", "vla.valid_episodes=[3]",
                   "train.eval_interval=12", "train.eval_steps=1")
    evals = [x for x in records(out) if x.get("split") != "train"]
    assert len(evals) == 1 and evals[0]["loss"] > 0              # held-out episode 3
    losses = [x["loss"] for x in records(out) if x.get("split") == "train"]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3, losses
    assert all("samples_per_s" in x for x in records(out) if x.get("split") == "train")
    assert (out / "checkpoints" / "vla.json").is_file()
    g = run_cli("generate", str(out / "checkpoints"), "--prompt", "episode=1,frame=3", "--steps", "2",
                "--output", str(data / "chunk.json"), cwd=data)
    assert g.returncode == 0, g.stderr[-2000:]
    chunk = json.loads((data / "chunk.json").read_text())
    assert (chunk["episode"], chunk["frame"], chunk["steps"]) == (1, 3, 2)
    assert len(chunk["actions"]) == 6 and all(len(a) == 2 for a in chunk["actions"])
    assert "action chunk (6 x 2) for episode 1 frame 3" in g.stdout


@pytest.mark.parametrize("mode, trainable", [
    ("vla.finetune=lora", lambda n: "lora_" in n),
    ("vla.finetune=expert_only", lambda n: not n.startswith(("net.vision", "net.projector", "net.embed", "net.vlm"))),
    ("vla.freeze_vision=true", lambda n: not n.startswith(("net.vision", "net.projector"))),
])
def test_finetune_modes_freeze_what_they_say(mode, trainable, tmp_path):
    from loongforge.config.compose import compose_config
    from loongforge.plugins import get_plugin_manager
    from loongforge.trainer.runtime import runtime
    from loongforge_embodied.data.synthetic import write_reaching_dataset
    from loongforge_embodied.task import VLAConfig, VLATrainTask

    write_reaching_dataset(tmp_path / "reaching", episodes=1, length=6, image_size=16)
    cfg = compose_config("pi05_tiny", [f"output_dir={tmp_path}", f"vla.data_root={tmp_path / 'reaching'}", mode])
    assert cfg.vla.finetune in ("full", "lora", "expert_only") and VLAConfig().finetune == "full"
    plugins = get_plugin_manager()
    cfg = VLATrainTask.resolve_config(cfg, plugins)
    with runtime(cfg, plugins) as rt:
        task = VLATrainTask(cfg, rt)
        task.build_datasets()
        (policy,) = task.build_model()
    params = dict(policy.named_parameters())
    unused = {"net." + n for n in policy.net.unused_in_training()} if "lora" not in mode else set()
    want = {n for n in params if trainable(n) and n not in unused}
    assert {n for n, p in params.items() if p.requires_grad} == want and want


def test_bf16_step(data):
    out, _ = train(data, "bf16", "train.steps=2", "train.precision=bf16")
    assert all(x["loss"] == x["loss"] for x in records(out))  # finite (not NaN)


@pytest.mark.slow
def test_data_parallel_loss_equals_one_process(data):
    one, _ = train(data, "one", "train.steps=3", "optimizer.distributed=true")
    two, _ = train(data, "two", "train.steps=3", "optimizer.distributed=true", nproc=2)
    a, b = [r["loss"] for r in records(one)], [r["loss"] for r in records(two)]
    assert b == pytest.approx(a, rel=1e-5)
