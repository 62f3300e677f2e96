"""Worker of test_lora_parity's TP test: ``torchrun --nproc-per-node N lora_tp_worker.py HF_WEIGHTS OUT_DIR``.

Builds the test's model at TP=N from the HF weights, adds LoRA (B from the test's seeded full
matrices, sharded like the weights), runs forward + backward of the summed per-token loss and
writes (rank 0) ``OUT_DIR/tp2_sp{0,1}.safetensors``: the gathered logits, the loss and the LoRA
gradients merged back to full matrices, without and with sequence parallelism; and the model's
distributed checkpoint (``OUT_DIR/ckpt_tp2``) for the resharding check."""

from __future__ import annotations

import os
import sys

import torch


def run_once(provider, backend, weights: str, out_dir: str, sequence_parallel: bool) -> dict[str, torch.Tensor]:
    import torch.distributed as dist
    from loongforge.model_provider import RunSettings
    from loongforge.peft.lora import apply_lora, lora_modules
    from loongforge.weight_mapping import safetensors_getter
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from test_lora_parity import ALPHA, RANK, batch, set_lora_b

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    run = RunSettings(tp=tp, sequence_parallel=sequence_parallel)
    model = provider.build(provider.transformer_config(run), run, backend=backend)
    provider.load_hf_weights(model, safetensors_getter(weights), run=run)
    apply_lora(model, RANK, ALPHA, 0.0, ["qkv", "proj", "fc1", "fc2"], seed=1)
    set_lora_b(model, provider, run, rank)
    ids, pos, labels = batch(provider)
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(ids, pos, None))
    loss = model(ids, pos, None, labels=labels).sum()
    loss.backward()
    if not sequence_parallel:  # a distributed checkpoint of the TP=2 adapters, loaded at TP=1 by the test
        from megatron.core import dist_checkpointing

        ckpt = os.path.join(out_dir, "ckpt_tp2")
        if dist.get_rank() == 0:
            os.makedirs(ckpt)
        dist.barrier()
        dist_checkpointing.save(model.sharded_state_dict(), ckpt)
    mapping = provider.weight_mapping(run)
    out = {"logits": logits, "loss": loss.detach().reshape(1)}
    for name, m in lora_modules(model).items():
        grads = {}
        for part in ("lora_A", "lora_B"):
            g = getattr(m, part).grad
            if getattr(getattr(m, part), "sequence_parallel", False):
                # what megatron's finalize_model_grads does for sequence-parallel (norm-like) params
                dist.all_reduce(g, group=parallel_state.get_tensor_model_parallel_group())
            parts = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(parts, g.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            grads[part] = parts
        if m.lora_column:  # A replicated: every rank holds the same full gradient; B sharded like W
            assert all(torch.allclose(x, grads["lora_A"][0], rtol=1e-6, atol=1e-9) for x in grads["lora_A"]), name
            out[f"{name}.lora_A"] = grads["lora_A"][0]
            out[f"{name}.lora_B"] = mapping.merge_tp(f"{name}.weight", grads["lora_B"])
        else:  # A sharded on its input dim like W; B replicated
            assert all(torch.allclose(x, grads["lora_B"][0], rtol=1e-6, atol=1e-9) for x in grads["lora_B"]), name
            out[f"{name}.lora_A"] = torch.cat(grads["lora_A"], dim=1)
            out[f"{name}.lora_B"] = grads["lora_B"][0]
    return out


def main(weights: str, out_dir: str) -> None:
    import torch.distributed as dist
    from loongforge.backends.cpu import CpuBackend
    from loongforge_llm.provider import LLMProvider
    from megatron.core import parallel_state
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    sys.path.insert(0, os.path.dirname(__file__))
    from test_lora_parity import CONFIG

    dist.init_process_group("gloo")
    backend = CpuBackend()
    with backend.activate():
        parallel_state.initialize_model_parallel(dist.get_world_size(), 1)
        backend.manual_seed(1234)
        provider = LLMProvider(OmegaConf.create(CONFIG))
        for sp in (False, True):
            out = run_once(provider, backend, weights, out_dir, sp)
            if dist.get_rank() == 0:
                save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(out_dir, f"tp2_sp{int(sp)}.safetensors"))
        parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
