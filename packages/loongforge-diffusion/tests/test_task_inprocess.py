"""WanTask parts in one process: EMA update/save/load; pretrained diffusers weights through build_model."""

from types import SimpleNamespace

import torch
from loongforge.config import compose_config
from loongforge.plugins import get_plugin_manager
from loongforge_diffusion.ema import FILE, load_ema_into
from loongforge_diffusion.task import WanTask


def test_ema_update_save_load(megatron_cpu, tmp_path):
    plugins = get_plugin_manager()
    cfg = compose_config("wan_tiny", ["diffusion.ema_decay=0.75", f"output_dir={tmp_path}"],
                         registry=plugins.registry())
    task = WanTask(WanTask.resolve_config(cfg, plugins), SimpleNamespace(backend=megatron_cpu, is_main=True, rank=0))
    (model,) = task.build_model()
    task.on_train_start(None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    task.step_metrics()  # the trainer calls it after each optimizer step
    for n, t in task.ema.shadow.items():
        assert torch.allclose(t, 0.75 * before[n] + 0.25 * (before[n] + 1.0)), n
    task.save_extra(tmp_path)
    assert (tmp_path / FILE).is_file() and (tmp_path / "wan_config.json").is_file()
    assert load_ema_into(model, tmp_path)
    for n, p in model.named_parameters():
        assert torch.allclose(p, before[n] + 0.25), n


def test_pretrained_diffusers_weights(megatron_cpu, tmp_path):
    from diffusers import WanTransformer3DModel
    from loongforge_diffusion.testing import rel_err

    plugins = get_plugin_manager()
    cfg = compose_config("wan_tiny", [f"output_dir={tmp_path}"], registry=plugins.registry())
    task = WanTask(WanTask.resolve_config(cfg, plugins), SimpleNamespace(backend=megatron_cpu, is_main=True, rank=0))
    torch.manual_seed(3)
    ref = WanTransformer3DModel(**{k: v for k, v in task.wan.to_diffusers().items() if not k.startswith("_")}).eval()
    ref.save_pretrained(tmp_path / "transformer")
    cfg.model.pretrained = str(tmp_path)  # a pipeline root holding transformer/
    (model,) = task.build_model()
    x, ctx = torch.randn(1, 8, 2, 4, 4), torch.randn(1, 16, 32)
    t = torch.full((1, 8), 600.0)
    with torch.no_grad():
        assert rel_err(model.eval()(x, t, ctx), ref(x, t, ctx, return_dict=False)[0]) < 1e-5
