"""FP8 linear layers and the optimizer memory levers on a GPU (NCCL world of one; skipped without
CUDA / FP8 tensor cores): a 4-layer GPTModel in DDP trains with each FP8 recipe within FP8 error
of bf16 (real torch scaled matmul), adaptive prints its per-shape choices, and megatron-core's
optimizer-state offload / our bf16 moments keep the loss of the plain optimizer. Run with
``pytest packages/loongforge-backend-cuda/tests/test_fp8_gpu.py -m gpu -s``."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                               reason="needs FP8 tensor cores (compute capability >= 8.9)")


def _gpt(distributed: bool = False, seq: int = 256):
    from loongforge.modules.layer_spec import local_sdpa_spec
    from loongforge_cuda.wgrad import fuse_wgrad_accumulation
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    config = TransformerConfig(num_layers=4, hidden_size=256, num_attention_heads=4, ffn_hidden_size=512,
                               bf16=True, params_dtype=torch.bfloat16, hidden_dropout=0.0, attention_dropout=0.0,
                               normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False)
    torch.manual_seed(3)
    model = GPTModel(config, local_sdpa_spec(config), vocab_size=1024, max_sequence_length=seq).cuda()
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=distributed), Float16Module(config, model))
    fuse_wgrad_accumulation([ddp])
    return ddp


def _loss(ddp, tokens):
    b, s = tokens.shape[0], tokens.shape[1] - 1
    ddp.zero_grad_buffer()
    loss = ddp(tokens[:, :-1], torch.arange(s, device="cuda").expand(b, s), None, labels=tokens[:, 1:]).float().mean()
    loss.backward()
    ddp.finish_grad_sync()
    return float(loss)


@needs_fp8
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "blockwise", "adaptive"])
def test_fp8_recipes_train_like_bf16(cuda_mcore, capsys, recipe):
    from loongforge_cuda.fp8 import apply_fp8
    from loongforge_cuda.wgrad import wgrad_accumulation_patch

    with wgrad_accumulation_patch():
        ddp = _gpt()
        tokens = torch.randint(0, 1024, (2, 257), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        ref = _loss(ddp, tokens)
        ref_grad = {n: p.main_grad.clone() for n, p in ddp.named_parameters()}
        layers = apply_fp8([ddp], recipe)
        loss = _loss(ddp, tokens)
        name = "module.module.decoder.layers.1.mlp.linear_fc1.weight"
        rel = float((ddp.get_parameter(name).main_grad - ref_grad[name]).norm() / ref_grad[name].norm())
        used = {r for m in layers.applied.values() for r in m._forward_impl.calls}
        print(f"{recipe}: loss bf16 {ref:.5f} fp8 {loss:.5f}; fc1 weight-gradient rel error {rel:.4f}; used {used}")
        assert loss == pytest.approx(ref, rel=1e-2) and rel < 0.1
        assert used and (recipe == "adaptive" or used == {recipe})
        layers.remove()
    if recipe == "adaptive":
        out = capsys.readouterr().out
        assert out.count("adaptive GEMM") == 4  # qkv, proj, fc1, fc2 shapes, each timed once


@pytest.mark.parametrize("lever", ["bf16moments", "offload"])
def test_memory_levers_keep_the_loss(cuda_mcore, lever):
    from loongforge.config.schema import RunConfig
    from loongforge.trainer.optim import build_optimizer
    from loongforge_cuda.backend import CudaBackend
    from omegaconf import OmegaConf

    def train(precision: dict):
        cfg = OmegaConf.structured(RunConfig)
        cfg.train.precision, cfg.optimizer.lr, cfg.optimizer.distributed = "bf16", 3e-3, True
        for key, value in precision.items():
            OmegaConf.update(cfg, f"precision.{key}", value)
        ddp = _gpt(distributed=True, seq=128)
        optimizer = build_optimizer(cfg, [ddp], CudaBackend())
        tokens = torch.randint(0, 1024, (2, 2, 129), device="cuda", generator=torch.Generator("cuda").manual_seed(4))
        losses = []
        for step in range(8):
            optimizer.zero_grad()
            losses.append(_loss(ddp, tokens[step % 2]))
            ok, _, _ = optimizer.step()
            assert ok
        return losses, optimizer

    ref, _ = train({})
    if lever == "offload":
        losses, opt = train({"optimizer_cpu_offload": True})
        devices = {v.device.type for st in getattr(opt, "chained_optimizers", [opt])[0].optimizer.state.values() for v in st.values() if torch.is_tensor(v)
                   and v.dim() > 0}
        print("offload: optimizer state devices", devices)
        assert "cpu" in devices
    else:
        losses, opt = train({"exp_avg_dtype": "bf16", "exp_avg_sq_dtype": "bf16"})
        dtypes = {st["exp_avg"].dtype for st in getattr(opt, "chained_optimizers", [opt])[0].optimizer.state.values() if "exp_avg" in st}
        assert dtypes == {torch.bfloat16}
    print(f"{lever}: losses {losses}\nplain:   {ref}")
    assert losses[-1] < losses[0]
    assert losses == pytest.approx(ref, rel=3e-2)
