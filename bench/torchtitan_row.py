"""The ``torchtitan`` row for bench/llm_step.py: torchtitan's own Llama 3 and its single-device step.

Needs the wheels of bench/fetch_torchtitan_wheels.sh on ``PYTHONPATH`` (torchtitan 0.2.2: 0.3.0's
llama3 package imports ``torch.distributed.fsdp.DataParallelMeshDims``, absent from torch 2.11).

What runs is what torchtitan 0.2.2's ``train.py`` does on one device with its ``JobConfig``
defaults, unless an option says otherwise:

- Model: ``torchtitan.models.llama3.Transformer`` with ``TransformerModelArgs`` from the section
  (dim, layers, heads, KV heads, FFN size, vocab, norm eps, RoPE theta and llama3 RoPE scaling,
  ``max_seq_len`` = the sequence length as its ``update_from_config`` sets), built on the meta
  device under ``training.dtype``, ``to_empty`` on the device, then its own ``init_weights``.
- Attention: ``attn_type="sdpa"`` (its default): its SDPA wrapper, causal, native GQA, backend
  priority cuDNN > flash > math.
- Precision: ``training.dtype=float32`` parameters, gradients and AdamW states; forward and loss
  under ``torch.autocast(bf16)`` (``maybe_enable_amp``: with no FSDP on one device, AMP is how it
  applies ``mixed_precision_param=bfloat16``). Option ``bf16``: ``training.dtype=bfloat16``, all
  bf16 (parameters, gradients, states) as the ``hf`` row.
- Loss: its ``cross_entropy_loss`` (sum over fp32 logits) divided by the token count, as its
  ``forward_backward_step``; gradient clipping with its ``clip_grad_norm_`` (max_norm 1.0,
  foreach); ``torch.optim.AdamW`` with its defaults (fused, lr 8e-4, betas 0.9/0.95, eps 1e-8,
  weight decay 0.1).
- Tied embeddings: 0.2.2's ``Transformer`` has none. Where the section ties (Llama-3.2-1B), the
  output weight is shared with the embedding after init (the output's trunc-normal init, as
  torchtitan 0.3.0's tied 1B flavor does), so N equals the other rows'. Option ``untied`` keeps
  0.2.2's two matrices (+vocab x hidden parameters in AdamW).

Differs from a real torchtitan run: its default activation checkpointing (selective, every 2nd
block) is off here, as in the other rows (option ``ac=selective|op|full`` applies its
``apply_ac``); no dataloader (random tokens made on the device, like the other rows), no LR
scheduler step, no checkpointing, no metrics. Like torchtitan on one device, no FSDP/DDP wrapper.
Options: ``mbs=N``; ``compile``: its ``apply_compile`` (each TransformerBlock through
``torch.compile(fullgraph=True)``) and the compiled loss, as ``compile.enable`` with its default
components ``["model", "loss"]``. The result has the ``row_hf`` keys plus ``params`` (parameters
in AdamW: tied counted once).
"""

from __future__ import annotations

import contextlib

import torch


def _model_args(section: dict, seq: int):
    from torchtitan.models.llama3 import TransformerModelArgs
    from torchtitan.models.llama3.model.args import RoPEScalingArgs

    dim, heads, ffn = section["hidden_size"], section["num_attention_heads"], section["intermediate_size"]
    if section.get("head_dim", dim // heads) != dim // heads:
        raise ValueError(f"torchtitan's Llama 3 needs head_dim = hidden/heads, got {section['head_dim']}")
    scaling = section.get("rope_scaling") or {}
    if scaling and scaling.get("rope_type") != "llama3":
        raise ValueError(f"torchtitan's Llama 3 has llama3 RoPE scaling only, got {scaling}")
    rope = RoPEScalingArgs(
        scaling_factor=scaling.get("factor", 1.0), low_freq_factor=scaling.get("low_freq_factor", 1.0),
        high_freq_factor=scaling.get("high_freq_factor", 4.0),
        original_max_position_embeddings=scaling.get("original_max_position_embeddings", seq))
    # its FeedForward sizes the hidden layer as round_up(int(m * int(2 * 4 * dim / 3)), multiple_of);
    # m = ffn / that and multiple_of = ffn give exactly ffn for any ffn
    base = int(2 * 4 * dim / 3)
    return TransformerModelArgs(
        dim=dim, n_layers=section["num_hidden_layers"], n_heads=heads,
        n_kv_heads=section.get("num_key_value_heads", heads), vocab_size=section["vocab_size"],
        multiple_of=ffn, ffn_dim_multiplier=ffn / base, norm_eps=section.get("rms_norm_eps", 1e-5),
        rope_theta=section.get("rope_theta", 10000.0), rope_scaling_args=rope, max_seq_len=seq,
        attn_type="sdpa")


def build_titan_model(section: dict, seq: int, device, *, dtype: str = "float32", untied: bool = False,
                      job_config=None):
    """torchtitan's order: meta build under training.dtype, AC/compile, to_empty, init_weights."""
    from torchtitan.models.llama3 import Transformer
    from torchtitan.tools.utils import set_default_dtype

    args = _model_args(section, seq)
    with torch.device("meta"), set_default_dtype(getattr(torch, dtype)):
        model = Transformer(args)
    ffn = model.layers["0"].feed_forward.w1.out_features
    if ffn != section["intermediate_size"]:
        raise ValueError(f"FFN size {ffn} != intermediate_size {section['intermediate_size']}")
    if job_config is not None:
        from torchtitan.distributed.activation_checkpoint import apply_ac
        from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list, apply_compile

        compiled = job_config.compile.enable and "model" in job_config.compile.components
        if job_config.activation_checkpoint.mode != "none":
            apply_ac(model, job_config.activation_checkpoint, model_compile_enabled=compiled,
                     op_sac_save_list=_op_sac_save_list)
        if compiled:
            apply_compile(model, job_config.compile)
    if str(device) != "meta":
        model.to_empty(device=device)
        with torch.no_grad():
            model.init_weights()
    if section.get("tie_word_embeddings") and not untied:
        model.tok_embeddings.weight = model.output.weight
    return model


def row_torchtitan(section: dict, args, opts: dict) -> dict:
    from llm_step import Clock, flops_per_token, time_steps
    from loongforge_llm.provider import LLMProvider
    from torchtitan.components.loss import build_cross_entropy_loss
    from torchtitan.config import JobConfig
    from torchtitan.distributed.utils import clip_grad_norm_

    mbs, seq = int(opts.get("mbs", args.mbs)), args.seq
    job = JobConfig()
    job.training.seq_len, job.training.local_batch_size = seq, mbs
    job.training.dtype = "bfloat16" if opts.get("bf16") else "float32"
    job.activation_checkpoint.mode = "none"
    if opts.get("ac"):
        ac = str(opts["ac"])
        job.activation_checkpoint.mode = "selective" if ac in ("selective", "op") else ac
        if ac == "op":
            job.activation_checkpoint.selective_ac_option = "op"
    job.compile.enable = bool(opts.get("compile"))
    torch.manual_seed(0)
    model = build_titan_model(section, seq, args.device, dtype=job.training.dtype,
                              untied=bool(opts.get("untied")), job_config=job)
    model.train()
    loss_fn = build_cross_entropy_loss(job)
    o = job.optimizer
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                  weight_decay=o.weight_decay, fused=o.implementation == "fused",
                                  foreach=o.implementation == "foreach")
    amp_dtype = getattr(torch, job.training.mixed_precision_param)
    amp = (torch.autocast(torch.device(args.device).type, dtype=amp_dtype)
           if job.training.dtype == "float32" else contextlib.nullcontext())
    vocab, ntokens = section["vocab_size"], float(mbs * seq)

    def step():
        tokens = torch.randint(0, vocab, (mbs, seq + 1), device=args.device)
        optimizer.zero_grad()
        with amp:
            pred = model(tokens[:, :-1])
            loss = loss_fn(pred, tokens[:, 1:]) / ntokens
        del pred
        loss.backward()
        clip_grad_norm_(params, job.training.max_norm, foreach=True)
        mid = clock.mark()
        optimizer.step()
        return loss.detach(), mid

    clock = Clock(args.device == "cuda")
    result = time_steps(step, clock, args.warmup, args.steps, profile=getattr(args, "profile", False))
    provider = LLMProvider(section)
    result.update(tokens=mbs * seq, flops_token=flops_per_token(provider, seq), mbs=mbs,
                  params=sum(p.numel() for p in params))
    return result
