"""LoRA under the CUDA backend's layer spec (fused RMSNorm / SwiGLU MLP, measured SDPA) on a GPU:
the exported adapter loaded with ``peft`` onto the HF model gives our logits (fp32, TF32 off), and
only the adapters receive gradients. Skipped without CUDA; run with ``pytest -m gpu`` on the
device machine (needs the loongforge-backend-cuda and loongforge-kernels plugins)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from loongforge.model_provider import RunSettings
from loongforge.peft.export import save_adapter
from loongforge.peft.lora import apply_lora
from loongforge_llm.provider import LLMProvider

sys.path.insert(0, os.path.dirname(__file__))  # the shared helpers (pytest imports tests by path)
from test_lora_parity import ALPHA, RANK, REL_TOL, hf_model, randomize_b, rel  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def cuda_mcore():
    """megatron-core in one NCCL process with the CUDA backend and every registered kernel."""
    import torch.distributed as dist
    from loongforge.testing import free_port
    from megatron.core import parallel_state

    cuda_backend = pytest.importorskip("loongforge_cuda.backend")
    kernels = pytest.importorskip("loongforge_kernels.plugin")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    dist.init_process_group("nccl", rank=0, world_size=1)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    backend = cuda_backend.CudaBackend()
    backend.configure_kernels(kernels.KERNELS)
    try:
        with backend.activate(0):
            parallel_state.initialize_model_parallel(1, 1)
            backend.manual_seed(1)
            yield backend
            parallel_state.destroy_model_parallel()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        dist.destroy_process_group()


@pytest.mark.parametrize("group,name", [("qwen3", "qwen3_tiny"), ("llama3", "llama3_tiny")])
def test_lora_on_fused_cuda_spec_matches_peft(cuda_mcore, load_size, tmp_path, group, name):
    provider = LLMProvider(load_size(group, name))
    hf = hf_model(provider)
    run = RunSettings(seq_length=64)
    ours = provider.build(provider.transformer_config(run), run, backend=cuda_mcore).cuda()
    provider.load_hf_weights(ours, hf.state_dict().__getitem__)
    kinds = {type(m).__name__ for m in ours.modules()}
    assert {"FusedRMSNorm", "FusedSwiGLUMLP"} <= kinds  # the adapters sit inside the fused modules' linears
    apply_lora(ours, RANK, ALPHA, 0.0, ["qkv", "proj", "fc1", "fc2"], seed=1)
    randomize_b(ours)
    ours.eval()
    vocab = provider.args.vocab_size
    ids = torch.randint(0, vocab, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    pos = torch.arange(64, device="cuda").expand(2, 64)
    with torch.no_grad():
        logits = ours(ids, pos, None)[..., :vocab]
    save_adapter(ours, provider.weight_mapping().matching([n for n, _ in ours.named_parameters()]),
                 tmp_path / "adapter", rank=RANK, alpha=ALPHA)
    import peft

    adapted = peft.PeftModel.from_pretrained(hf.cuda(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        ref = adapted(input_ids=ids).logits
    err = rel(logits, ref)
    ours.train()
    ours(ids[:, :-1], pos[:, :-1], None, labels=ids[:, 1:]).sum().backward()
    with_grad = [n for n, p in ours.named_parameters() if p.grad is not None]
    print(f"\nGPU {name}: LoRA logits |ours - peft| / |peft| = {err:.2e}; gradients on {len(with_grad)} tensors")
    assert err < REL_TOL
    assert with_grad and all(n.endswith((".lora_A", ".lora_B")) for n in with_grad)
