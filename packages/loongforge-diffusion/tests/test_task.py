"""``wan_pretrain`` end to end through the CLI: preprocessing, training (loss falls), a sample
video, ``loongforge generate``; DP=2 with the distributed optimizer equals one process; config errors."""

import json

import pytest
from loongforge.config import ConfigError, compose_config
from loongforge.plugins import get_plugin_manager
from loongforge.testing import run_cli
from loongforge_diffusion.task import WanTask

SMALL = ["diffusion.synthetic_clips=6", "diffusion.num_frames=5", "diffusion.buckets=[[32,32]]",
         "diffusion.sample_steps=2", "train.log_interval=1", "train.global_batch_size=4", "train.micro_batch_size=4"]


def _losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("split") == "train"]


def test_wan_tiny_trains_samples_and_generates(tmp_path):
    out = tmp_path / "run"
    r = run_cli("run", "wan_tiny", f"output_dir={out}", "train.steps=8", *SMALL, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    losses = _losses(out)
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2]), losses
    from PIL import Image

    gif = Image.open(out / "samples" / "sample.gif")
    assert gif.size == (32, 32) and gif.n_frames == 5
    index = json.loads((out / "latents" / "index.json").read_text())
    assert index["num_samples"] == 6 and index["samples"][0]["latent_shape"] == [8, 2, 4, 4]
    g = run_cli("generate", str(out / "checkpoints"), "--prompt", "a red square moving up", "--output",
                str(tmp_path / "g.mp4"), "--steps", "2", env={"OMP_NUM_THREADS": "1"})
    assert g.returncode == 0, g.stderr[-3000:]
    assert (tmp_path / "g.mp4").stat().st_size > 0


def test_dp2_distributed_optimizer_equals_one_process(tmp_path):
    common = ["train.steps=3", *SMALL[:5], "train.global_batch_size=4", "train.micro_batch_size=2",
              "diffusion.sample_at_end=false", f"diffusion.latents={tmp_path / 'latents'}", "diffusion.cfg_dropout=0.5"]
    env = {"OMP_NUM_THREADS": "1"}
    one = run_cli("run", "wan_tiny", f"output_dir={tmp_path / 'one'}", *common, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli("run", "--nproc-per-node", "2", "wan_tiny", f"output_dir={tmp_path / 'two'}",
                  "optimizer.distributed=true", *common, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)


@pytest.mark.parametrize("overrides,key", [
    (["diffusion.num_frames=8"], "diffusion.num_frames"),
    (["diffusion.buckets=[[64,60]]"], "diffusion.buckets"),
    (["diffusion.expert=high"], "diffusion.expert"),
    (["parallel.cp=3"], "parallel.cp"),
    (["parallel.pp=2"], "parallel.pp"),
    (["model.num_heads=2"], "model.num_heads"),
    (["diffusion.synthetic_clips=0"], "diffusion.manifests"),
    (["diffusion.timestep_sampling=beta"], "diffusion.timestep_sampling"),
])
def test_config_errors_name_the_key(overrides, key):
    plugins = get_plugin_manager()
    cfg = compose_config("wan_tiny", overrides, registry=plugins.registry())
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        WanTask.resolve_config(cfg, plugins)


def test_unknown_diffusion_key_fails():
    with pytest.raises(ConfigError, match="diffusion.shfit"):
        compose_config("wan_tiny", ["+diffusion.shfit=3"], registry=get_plugin_manager().registry())


def test_preprocess_task_and_bad_manifest(tmp_path):
    from loongforge.data.errors import DataError
    from loongforge_diffusion.task import run_preprocess

    plugins = get_plugin_manager()
    cfg = compose_config("wan_tiny", [*SMALL[:3], "diffusion.synthetic_clips=2", "task=wan_preprocess",
                                      f"output_dir={tmp_path}"], registry=plugins.registry())
    out = run_preprocess(cfg, plugins)
    index = json.loads((tmp_path / "latents" / "index.json").read_text())
    assert out["latents"] == str(tmp_path / "latents") and index["num_samples"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"video": "synthetic/clip_00000.mp4", "text": "no caption key"}) + "\n")
    cfg = compose_config("wan_tiny", [*SMALL[:3], f"diffusion.manifests=[{bad}]", f"output_dir={tmp_path / 'b'}"],
                         registry=plugins.registry())
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing or non-string 'caption'"):
        run_preprocess(cfg, plugins)
