"""Parallel layout: validation up front, megatron-core process groups, data-parallel wrapping."""

from __future__ import annotations

from dataclasses import dataclass

from loongforge.errors import LoongForgeError


class LayoutError(LoongForgeError, ValueError):
    """An impossible parallel layout; the message says which numbers clash."""


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    pp: int
    cp: int
    vpp: int | None
    dp: int
    micro_batch_size: int
    global_batch_size: int

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)


def validate_layout(cfg, world_size: int, num_layers: int | None = None, num_heads: int | None = None,
                    num_kv_heads: int | None = None, num_experts: int | None = None) -> Layout:
    """Check the config's parallel sizes against the world, the model and the batch sizes.
    ``num_experts``: routed experts per MoE layer (``None``: a dense model)."""
    p, t = cfg.parallel, cfg.train
    for key in ("tp", "pp", "cp", "ep", "etp"):
        if p.get(key, 1) < 1:
            raise LayoutError(f"parallel.{key}={p[key]} must be >= 1")
    _validate_experts(p, world_size, num_experts)
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        raise LayoutError(
            f"world size {world_size} is not a multiple of parallel.tp x parallel.pp x parallel.cp "
            f"= {p.tp} x {p.pp} x {p.cp} = {model_parallel}"
        )
    dp = world_size // model_parallel
    if num_heads is not None and num_heads % p.tp:
        raise LayoutError(f"model num_attention_heads={num_heads} is not divisible by parallel.tp={p.tp}")
    if num_kv_heads is not None and num_kv_heads % p.tp:
        raise LayoutError(f"model num_key_value_heads={num_kv_heads} is not divisible by parallel.tp={p.tp}")
    if p.vpp is not None and p.vpp < 1:
        raise LayoutError(f"parallel.vpp={p.vpp} must be >= 1 (or null)")
    if p.vpp is not None and p.vpp > 1 and p.pp < 2:
        raise LayoutError(f"parallel.vpp={p.vpp} needs parallel.pp >= 2 (got {p.pp})")
    stages = p.pp * (p.vpp or 1)
    if num_layers is not None and num_layers % stages:
        raise LayoutError(
            f"model num_hidden_layers={num_layers} is not divisible by parallel.pp x parallel.vpp "
            f"= {p.pp} x {p.vpp or 1} = {stages}"
        )
    if p.sequence_parallel and p.tp < 2:
        raise LayoutError("parallel.sequence_parallel=true needs parallel.tp >= 2")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise LayoutError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size "
            f"x data-parallel size = {t.micro_batch_size} x {dp} = {t.micro_batch_size * dp}"
        )
    if (p.vpp or 1) > 1:
        # megatron-core 0.19.2's interleaved schedule runs micro-batches in groups of
        # microbatch_group_size_per_vp_stage (default: pp) per virtual stage; it refuses fewer
        # micro-batches than pp and a last group smaller than pp, so M must be a multiple of pp
        microbatches = t.global_batch_size // (t.micro_batch_size * dp)
        if microbatches % p.pp:
            raise LayoutError(
                f"parallel.vpp={p.vpp} (interleaved pipeline) needs the number of micro-batches per step, "
                f"train.global_batch_size / (train.micro_batch_size x data-parallel size) = "
                f"{t.global_batch_size} / ({t.micro_batch_size} x {dp}) = {microbatches}, "
                f"to be a multiple of parallel.pp={p.pp}"
            )
    if p.cp > 1 and t.seq_length % (2 * p.cp):
        raise LayoutError(f"train.seq_length={t.seq_length} is not divisible by 2 x parallel.cp = {2 * p.cp} "
                          f"(context parallelism cuts each sequence into 2 x cp chunks)")
    if p.tp > 1 and p.sequence_parallel and t.seq_length % (p.tp * p.cp):
        raise LayoutError(f"train.seq_length={t.seq_length} is not divisible by parallel.tp x parallel.cp = "
                          f"{p.tp} x {p.cp} (sequence parallelism splits the seq_length / cp tokens of each "
                          f"context-parallel rank over the tensor-parallel ranks)")
    return Layout(world_size, p.tp, p.pp, p.cp, p.vpp, dp, t.micro_batch_size, t.global_batch_size)


def _validate_experts(p, world_size: int, num_experts: int | None) -> None:
    """Expert parallelism: megatron-core lays the MoE layers' ranks out as pp x ep x etp x expert-dp
    (attention keeps pp x tp x cp x dp over the same ranks)."""
    ep, etp = p.get("ep", 1), p.get("etp", 1)
    if ep == 1 and etp == 1:
        return
    if num_experts is None:
        raise LayoutError(f"parallel.ep={ep} / parallel.etp={etp} need a mixture-of-experts model "
                          "(the model section has no num_experts)")
    if num_experts % ep:
        raise LayoutError(f"parallel.ep={ep} does not divide the model's num_experts={num_experts}")
    expert_parallel = ep * etp * p.pp
    if world_size % expert_parallel:
        raise LayoutError(f"world size {world_size} is not a multiple of parallel.ep x parallel.etp x parallel.pp "
                          f"= {ep} x {etp} x {p.pp} = {expert_parallel}")
    if p.tp > 1 and not p.sequence_parallel:
        raise LayoutError(f"parallel.tp={p.tp} with an MoE model needs parallel.sequence_parallel=true "
                          "(megatron-core's MoE layer refuses tensor parallelism without it)")


def configure_pipeline_schedule(config, layout: Layout) -> None:
    """Pipeline point-to-point settings of megatron-core's ``TransformerConfig`` for ``layout``.

    Interleaved pipelines (vpp > 1) use separate isend/irecv calls that overlap with compute
    (``overlap_p2p_comm=True, batch_p2p_comm=False``, Megatron-LM's own default for interleaving)
    instead of one batched ``batch_isend_irecv``. Besides being faster, this is needed for
    correctness at pp = 2: there the previous and the next stage are the same rank, and the batched
    exchange posts two sends and two receives to that one peer in an order that pairs activations
    with gradients (same shapes, so nothing fails: the loss is silently wrong; NVIDIA/Megatron-LM
    issues #750 and #1450). ``_p2p_ops`` keeps the two directions apart.
    """
    if (layout.vpp or 1) > 1:
        config.overlap_p2p_comm = True
        config.batch_p2p_comm = False


def single_process_layout() -> dict:
    """The ``parallel`` section of a one-process run (every size 1, the schema's defaults): what
    generation and exports from a checkpoint of any layout run under."""
    from dataclasses import asdict

    from loongforge.config.schema import ParallelConfig

    return asdict(ParallelConfig())


def init_model_parallel(cfg):
    """megatron-core's parallel state for ``cfg.parallel``; returns its ProcessGroupCollection."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp if (p.vpp or 1) > 1 else None,
        context_parallel_size=p.cp,
        expert_model_parallel_size=p.get("ep", 1),
        expert_tensor_parallel_size=p.get("etp", 1),
    )
    return ProcessGroupCollection.use_mpu_process_groups()


def wrap_data_parallel(modules, cfg):
    """Wrap each model chunk in megatron-core's DDP (grads summed; the loss divides by tokens)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    grads = cfg.precision.main_grads_dtype if "precision" in cfg else "fp32"
    if grads not in ("fp32", "bf16"):
        from loongforge.config import ConfigError

        raise ConfigError(f"config key 'precision.main_grads_dtype': {grads!r} is not one of fp32, bf16")
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grads == "fp32",
        overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.optimizer.distributed,
        average_in_collective=False,
    )
    return [
        DistributedDataParallel(config=m.config, ddp_config=ddp_config, module=m,
                                disable_bucketing=i > 0)
        for i, m in enumerate(modules)
    ]
