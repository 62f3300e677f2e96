"""The run config's schema. Unknown keys are rejected when the composed config is merged into it.

Precedence, lowest first: these defaults < the config file (and its defaults list) < command-line
overrides. The ``model`` section is free-form here and validated by the model family's provider.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TokenizerConfig:
    #: a local HF tokenizer directory, or ``builtin:tiny_stories`` for the shipped one
    path: str = "builtin:tiny_stories"
    type: str = "hf"


@dataclass
class DataConfig:
    format: str = "text"  # text (jsonl/parquet) | indexed | any registered dataset type
    paths: list[str] = field(default_factory=lambda: ["builtin:tiny_stories"])
    weights: list[float] | None = None
    text_field: str = "text"
    on_error: str = "raise"  # raise | skip
    valid_paths: list[str] | None = None
    valid_fraction: float = 0.0
    #: seeded document shuffle before packing
    shuffle: bool = True
    #: size of the training blend; None: the datasets' total
    num_samples: int | None = None
    #: block-diagonal causal attention inside packed sequences (no attention across documents)
    document_attention: bool = True


@dataclass
class RecomputeConfig:
    granularity: str | None = None  # None | full | selective
    method: str | None = None  # uniform | block
    num_layers: int | None = None


@dataclass
class TrainConfig:
    steps: int = 100
    seq_length: int = 256
    micro_batch_size: int = 4
    #: micro_batch_size x gradient-accumulation steps x data-parallel size
    global_batch_size: int = 8
    precision: str = "fp32"  # fp32 | bf16
    grad_clip: float = 1.0
    eval_interval: int = 0  # 0: no evaluation
    eval_steps: int = 2
    log_interval: int = 1
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)


@dataclass
class OptimizerConfig:
    name: str = "adam"  # adam (AdamW: decoupled weight decay) | sgd
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    #: megatron-core's distributed optimizer (optimizer state sharded over data-parallel ranks)
    distributed: bool = False


@dataclass
class SchedulerConfig:
    type: str = "cosine"  # constant | cosine | wsd
    warmup_steps: int = 10
    #: steps over which the LR decays after warm-up; None: until train.steps
    decay_steps: int | None = None
    #: for wsd: fraction of decay_steps spent in the final decay
    wsd_decay_fraction: float = 0.2


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    cp: int = 1
    #: expert parallelism (MoE models): the experts of each MoE layer split over ``ep`` ranks
    ep: int = 1
    #: expert tensor parallelism: each expert's FFN split over ``etp`` ranks (1: whole experts)
    etp: int = 1
    sequence_parallel: bool = False


@dataclass
class CheckpointConfig:
    dir: str | None = None  # default: <output_dir>/checkpoints
    save_interval: int = 0  # 0: only at the end
    save_final: bool = True
    #: None: start fresh; "auto": resume from dir/latest if present; or a checkpoint path
    load: str | None = "auto"
    keep_last: int | None = 2
    #: load only the model weights from ``load`` (continued pre-training: new data, new schedule)
    weights_only: bool = False
    #: a fresh run (load=null) into a directory holding another run's checkpoints deletes them
    #: (false: refused, naming the directory); see loongforge.trainer.compat
    overwrite: bool = False
    save_hf: bool = False
    #: with save_hf: also export <dir>/hf_step_N every N steps (0: only the final <dir>/hf)
    save_hf_interval: int = 0


@dataclass
class LoggingConfig:
    progress: bool = True
    tensorboard: bool = True
    loss_curve: bool = True


@dataclass
class KernelsConfig:
    disable: list[str] = field(default_factory=list)


@dataclass
class SFTConfig:
    """Supervised fine-tuning (``task: sft``); see ``loongforge.data.sft``."""

    #: auto (per record) | messages | sharegpt | alpaca
    format: str = "auto"
    #: a built-in template name (chatml, plain), ``tokenizer`` (its own chat_template) or a Jinja string
    chat_template: str = "chatml"
    loss_on: str = "assistant"  # assistant | all
    #: several conversations per sequence (document-aware attention with data.document_attention)
    packing: bool = True
    #: re-split each global batch over data-parallel ranks by estimated cost a*len + b*len^2
    balance_dp: bool = True
    cost_a: float = 1.0
    #: None: 1 / (12 * hidden_size) (attention vs. matrix-product FLOPs per token)
    cost_b: float | None = None


@dataclass
class LoRAConfig:
    rank: int = 0  # 0: LoRA off
    alpha: float = 16.0
    dropout: float = 0.0
    #: qkv, proj, fc1, fc2 (megatron's linear_qkv, linear_proj, linear_fc1, linear_fc2)
    target_modules: list[str] = field(default_factory=lambda: ["qkv", "proj", "fc1", "fc2"])


@dataclass
class PeftConfig:
    lora: LoRAConfig = field(default_factory=LoRAConfig)


@dataclass
class FP8Config:
    """FP8 linear layers (``precision.fp8``; the CUDA backend, compute capability >= 8.9). Master
    weights and the optimizer stay as ``train.precision`` / ``optimizer`` say (bf16 + fp32 master)."""

    #: None: off | tensorwise | rowwise | blockwise (1x128 activation tiles, 128x128 weight blocks)
    #: | adaptive (per GEMM shape, the fastest of bf16 and the recipes within ``error_budget``)
    recipe: str | None = None
    #: linear layers kept in bf16: fnmatch patterns on module names (``output_layer``: the LM head;
    #: ``first`` / ``last``: the first / last transformer layer). Default: all three
    exclude: list[str] = field(default_factory=lambda: ["output_layer", "first", "last"])
    #: adaptive: largest relative Frobenius error of a recipe's output vs the bf16 GEMM it may replace
    error_budget: float = 0.08


@dataclass
class PrecisionConfig:
    """Optimizer-state precision and placement, and FP8 (``train.precision`` stays the compute dtype).
    See ``loongforge.trainer.optim`` for what each key maps to."""

    #: AdamW first / second moment storage: fp32 | bf16 (updated in fp32 either way)
    exp_avg_dtype: str = "fp32"
    exp_avg_sq_dtype: str = "fp32"
    #: master weights: fp32 | bf16 (bf16 only with megatron's precision-aware optimizer, which needs TE)
    main_params_dtype: str = "fp32"
    #: megatron-core's precision-aware optimizer (Transformer Engine's FusedAdam, distributed optimizer)
    use_precision_aware_optimizer: bool = False
    #: megatron-core's optimizer-state offload to host memory (CUDA, distributed optimizer)
    optimizer_cpu_offload: bool = False
    optimizer_offload_fraction: float = 1.0
    #: gradient buffer (DDP main_grad) dtype: fp32 | bf16
    main_grads_dtype: str = "fp32"
    fp8: FP8Config = field(default_factory=FP8Config)
    #: the CUDA backend's layer spec: local (ours) | te (megatron-core's Transformer Engine spec, extra ``te``)
    layer_spec: str = "local"


@dataclass
class RunConfig:
    task: str = "pretrain"
    backend: str | None = None  # None: the available backend with the highest priority
    seed: int = 1234
    output_dir: str = "outputs/run"
    model: dict[str, Any] = field(default_factory=dict)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
