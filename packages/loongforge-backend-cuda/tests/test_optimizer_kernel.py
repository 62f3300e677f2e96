"""megatron-core's mixed-precision optimizer stepping through the ``adamw_step`` kernel
(``loongforge.trainer.optim.KernelAdamW``: one multi-tensor AdamW that also writes the bf16 model
params, gradient clipping as its ``grad_scale``) gives the same masters, moments and bf16 params
as torch's AdamW + megatron's master -> model copy, on a real GPTModel with megatron DDP; and its
state dict is torch AdamW's, so a checkpoint resumes on either."""

from __future__ import annotations

import pytest
import torch
from loongforge.testing import megatron_adam, megatron_train_step, single_process_megatron, tiny_bf16_gpt
from loongforge.trainer import multi_tensor
from loongforge.trainer.optim import KernelAdamW, use_fused_adam
from loongforge_kernels.adamw import adamw_step

STEPS, LR, CLIP = 3, 1e-2, 0.05


def _train(kernel: bool, steps: int = STEPS, state_from=None):
    with single_process_megatron(seed=7):
        model, _ = tiny_bf16_gpt()
        optimizer = megatron_adam(model, LR, CLIP)
        use_fused_adam(optimizer, adamw_step=adamw_step if kernel else None)
        inner = optimizer.chained_optimizers[0]
        assert isinstance(inner.optimizer, KernelAdamW) is kernel
        if state_from is not None:
            optimizer.load_state_dict(state_from)
        tokens = torch.randint(0, 96, (STEPS, 2, 17), generator=torch.Generator().manual_seed(3))
        norms = []
        for step in range(steps):
            _, (ok, grad_norm, _) = megatron_train_step(model, optimizer, tokens[step],
                                                        multi_tensor.foreach_multi_tensor_ops)
            assert ok
            assert getattr(inner.optimizer, "grad_scale", None) is None  # the clip factor is per step
            norms.append(float(grad_norm))
        masters = [p.detach().clone() for group in inner.fp32_from_float16_groups for p in group]
        moments = [(s["exp_avg"].clone(), s["exp_avg_sq"].clone(), float(s["step"]))
                   for s in inner.optimizer.state.values()]
        params = [p.detach().clone() for group in inner.float16_groups for p in group]  # as masters
        return norms, masters, moments, params, optimizer.state_dict()


def test_kernel_adamw_matches_torch_adamw_and_megatron_copy():
    ref_norms, ref_masters, ref_moments, ref_params, _ = _train(kernel=False)
    norms, masters, moments, params, _ = _train(kernel=True)
    assert min(ref_norms) > CLIP, "clipping must be exercised"
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    # torch's fused kernel and the kernel (torch's single-tensor AdamW arithmetic) round differently;
    # Adam's m / sqrt(v) turns that into up to ~1e-3 of an update (lr) on elements whose gradients
    # are ~0, and ~1e-9 everywhere else
    off = sum(int(((ours - ref).abs() > 1e-6).sum()) for ours, ref in zip(masters, ref_masters, strict=True))
    assert off <= 1e-3 * sum(m.numel() for m in masters)
    for ours, ref in zip(masters, ref_masters, strict=True):
        torch.testing.assert_close(ours, ref, rtol=0, atol=LR / 100)
    for (m, v, step), (m_ref, v_ref, step_ref) in zip(moments, ref_moments, strict=True):
        assert step == step_ref == STEPS
        torch.testing.assert_close(m, m_ref, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(v, v_ref, rtol=1e-5, atol=1e-10)
    # the model params are the kernel's bf16 copies of the masters (megatron's copy was skipped)
    for ours, master in zip(params, masters, strict=True):
        assert torch.equal(ours, master.to(torch.bfloat16))
    for ours, ref in zip(params, ref_params, strict=True):
        torch.testing.assert_close(ours.float(), ref.float(), rtol=2**-7, atol=LR / 100)


def test_kernel_adamw_state_dict_resumes_torch_adamw():
    """One step with the kernel, then its state dict continues under torch's AdamW (and back):
    the same two-step result as either path alone."""
    *_, state_kernel = _train(kernel=True, steps=1)
    *_, state_torch = _train(kernel=False, steps=1)
    assert state_kernel["optimizer"]["state"].keys() == state_torch["optimizer"]["state"].keys()
    resumed = _train(kernel=False, steps=1, state_from=state_kernel)
    resumed_back = _train(kernel=True, steps=1, state_from=state_torch)
    for a, b in zip(resumed[2], resumed_back[2], strict=True):
        assert a[2] == b[2] == 2.0  # the step count carried over
        torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-7)


def _losses_with_checkpoint(tmp_path, kernel: bool, steps: int, save_at=None, resume=False):
    """Per-step losses of a tiny GPTModel trained with megatron's optimizer; saves a trainer
    checkpoint after ``save_at`` steps, or (``resume``) starts from the latest one."""
    from loongforge.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    with single_process_megatron(seed=7) as backend:
        model, _ = tiny_bf16_gpt()
        optimizer = megatron_adam(model, LR, CLIP)
        use_fused_adam(optimizer, adamw_step=adamw_step if kernel else None)
        first = 0
        if resume:
            first = load_checkpoint(latest_checkpoint(tmp_path), [model], optimizer, backend)["step"]
        tokens = torch.randint(0, 96, (steps, 2, 17), generator=torch.Generator().manual_seed(3))
        losses = []
        for step in range(first, steps):
            loss, (ok, _, _) = megatron_train_step(model, optimizer, tokens[step], multi_tensor.foreach_multi_tensor_ops)
            assert ok
            losses.append(loss.item())
            if save_at == step + 1:
                save_checkpoint(tmp_path, step + 1, [model], optimizer, {"step": step + 1}, backend)
        return losses


@pytest.mark.parametrize("kernel", [True, False], ids=["adamw_step", "torch-fused"])
def test_resume_from_trainer_checkpoint_continues_exactly(tmp_path, kernel):
    full = _losses_with_checkpoint(tmp_path / "full", kernel, steps=4)
    part = _losses_with_checkpoint(tmp_path / "part", kernel, steps=2, save_at=2)
    resumed = _losses_with_checkpoint(tmp_path / "part", kernel, steps=4, resume=True)
    assert part == full[:2]
    assert resumed == full[2:]
