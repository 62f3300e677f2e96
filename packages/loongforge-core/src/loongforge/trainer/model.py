"""Build the model chunks of this pipeline rank (one per virtual stage)."""

from __future__ import annotations

from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.transformer.module import Float16Module

from loongforge.model_provider import RunSettings
from loongforge.model_section import model_provider, resolve_model_section

__all__ = ["build_model_chunks", "count_parameters", "load_pretrained", "model_provider", "resolve_model_section",
           "run_settings"]


def run_settings(cfg) -> RunSettings:
    p, t = cfg.parallel, cfg.train
    return RunSettings(
        tp=p.tp, pp=p.pp, vpp=p.vpp if (p.vpp or 1) > 1 else None, cp=p.cp, ep=p.ep, etp=p.etp,
        sequence_parallel=p.sequence_parallel, bf16=t.precision == "bf16", seq_length=t.seq_length,
        recompute_granularity=t.recompute.granularity, recompute_method=t.recompute.method,
        recompute_num_layers=t.recompute.num_layers,
    )


def build_model_chunks(provider, settings: RunSettings, backend, plugins) -> list:
    """One module per virtual pipeline stage of this rank, on the backend's device."""
    config = provider.transformer_config(settings)
    per_token_loss_settings(config)
    chunks = []
    for vp_stage in range(settings.vpp or 1):
        vp = vp_stage if settings.vpp else None
        chunk = provider.build(
            config, settings, backend=backend,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            vp_stage=vp,
        )
        chunks.append(chunk.to(backend.device()))
    return wrap_precision(chunks, config, settings.bf16)


def wrap_precision(chunks: list, config, bf16: bool) -> list:
    """bf16 runs: each chunk in megatron-core's ``Float16Module`` (bf16 weights and compute; the
    optimizer keeps fp32 master weights). A task's ``build_model`` calls this last."""
    return [Float16Module(config, chunk) for chunk in chunks] if bf16 else chunks


def per_token_loss_settings(config) -> None:
    """Losses are summed per unit and gradients divided by the global number of units in
    ``finalize_model_grads``, so gradient accumulation and data parallelism give the mean over
    the global batch (the trainer applies this to every task's model config)."""
    config.calculate_per_token_loss = True
    config.finalize_model_grads_func = finalize_model_grads


def load_pretrained(provider, chunks, path: str) -> None:
    """Each rank reads from the HF safetensors only its pipeline stage's tensors, and of those
    only its tensor-parallel rows/columns (``WeightMapping.hf_to_ours`` with lazy slices)."""
    from loongforge.weight_mapping import safetensors_getter

    get = safetensors_getter(path)
    for chunk in chunks:
        provider.load_hf_weights(chunk, get)


def count_parameters(chunks) -> int:
    """Parameters of this rank's chunks (shared embeddings counted once)."""
    seen, total = set(), 0
    for chunk in chunks:
        for p in chunk.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
    return total
