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


def _equal_runs(tmp_path, variants):
    """Each variant (name, extra args) trains the same 3 steps; all losses equal the first's."""
    common = ["train.steps=3", *SMALL[:5], "train.global_batch_size=4", "train.micro_batch_size=2",
              "diffusion.sample_at_end=false", f"diffusion.latents={tmp_path / 'latents'}", "diffusion.cfg_dropout=0.5"]
    env = {"OMP_NUM_THREADS": "1"}
    losses = {}
    for name, extra in variants:
        launch = ["--nproc-per-node", "2"] if "2proc" in name else []
        r = run_cli("run", *launch, "wan_tiny", f"output_dir={tmp_path / name}", *common, *extra, env=env)
        assert r.returncode == 0, (name, r.stderr[-3000:])
        losses[name] = _losses(tmp_path / name)
    ref = losses[variants[0][0]]
    assert len(ref) == 3
    for name, got in losses.items():
        for x, y in zip(ref, got, strict=True):
            assert abs(x - y) <= 1e-5 * abs(x), (name, losses)


def test_dp2_distributed_optimizer_equals_one_process(tmp_path):
    _equal_runs(tmp_path, [("one", []), ("dp_2proc", ["optimizer.distributed=true"])])


def test_cp2_and_packing_equal_one_process(tmp_path):
    """Ulysses CP over 2 processes (loss scaled by cp, integer sample counts) and packed
    micro-batches give the losses of the plain one-process run."""
    _equal_runs(tmp_path, [("one", []), ("cp_2proc", ["parallel.cp=2"]), ("packed", ["diffusion.packing=true"])])


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


def test_a14b_both_experts_run(tmp_path):
    """A tiny A14B-style run (boundary_ratio, per-sample timesteps) trains both experts in one
    chunk, in bf16 (megatron's Float16Module), and samples with the switch between them."""
    out = tmp_path / "run"
    r = run_cli("run", "wan_tiny", f"output_dir={out}", "train.steps=2", *SMALL, "model.boundary_ratio=0.875",
                "model.expand_timesteps=false", "diffusion.sample_steps=4", "train.precision=bf16", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(_losses(out)) == 2 and (out / "samples" / "sample.gif").is_file()
