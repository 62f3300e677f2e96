"""The token-embedding / LM-head weight gradient accumulated straight into DDP's fp32 ``main_grad``.

By default the embedding's backward zero-fills a dense bf16 ``[V, H]`` gradient and scatters into
it, the LM head returns another dense bf16 ``[V, H]`` gradient, autograd adds the two (tied
weights) and megatron-core DDP's hook adds the sum into the fp32 ``main_grad``: four passes over
the largest weight (~3 ms a step for the Llama-3.2-1B shape on an H100). Here the embedding's
backward adds its rows into ``main_grad`` (``index_put_(accumulate=True)``: on CUDA a stable radix
sort of the ids, then each row's repeats summed in order by one warp, so deterministic -- torch's
own CUDA embedding backward is only with ``torch.use_deterministic_algorithms``) and the fused
LM-head loss adds its fp32 accumulator there in one pass (``weight_grad_into``).

DDP only marks a parameter ready when autograd delivers a gradient to it, so, as megatron-core's
``gradient_accumulation_fusion`` does, exactly one of the weight's uses returns an uninitialised
dummy (never read: no memory traffic) and sets ``weight.grad_added_to_main_grad``, which makes
DDP's hook skip its add; the other uses return ``None`` (so autograd adds nothing). For tied
weights that is the LM head (the embedding's contribution may also meet an unfused LM head's real
gradient, which DDP then adds as usual; megatron's ``zero_out_wgrad``, which makes a tied LM
head's dummy zeros for DDP to add, is turned off as nothing needs it); otherwise the embedding.

:func:`fuse_embedding_grad_accumulation` switches it on after DDP has created the ``main_grad``s.
"""

from __future__ import annotations

import types

import torch

#: a weight attribute: the fused LM-head loss adds this weight's gradient into its ``main_grad``
LM_HEAD_ATTR = "lm_head_grad_into_main_grad"


def _ready_dummy(weight: torch.Tensor) -> torch.Tensor:
    """A gradient that only tells DDP the weight is done (its contributions are in ``main_grad``)."""
    weight.grad_added_to_main_grad = True
    return torch.empty_like(weight)  # uninitialised and stolen by AccumulateGrad: no pass over [V, H]


def add_rows(main_grad: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor) -> None:
    """``main_grad[ids[i]] += rows[i]``, deterministically: on CUDA ``index_put_`` (sorted), on
    the CPU ``index_add_`` (``index_put_`` there adds with parallel atomics)."""
    if main_grad.is_cuda:
        main_grad.index_put_((ids,), rows, accumulate=True)
    else:
        main_grad.index_add_(0, ids, rows)


class _EmbeddingIntoMainGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, gives_ready):
        ctx.save_for_backward(ids)
        ctx.weight, ctx.gives_ready = weight, gives_ready
        return torch.nn.functional.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        main_grad = weight.main_grad
        add_rows(main_grad, ids.reshape(-1), grad.reshape(-1, main_grad.shape[1]).to(main_grad.dtype))
        return None, (_ready_dummy(weight) if ctx.gives_ready else None), None


class _MainGradReady(torch.autograd.Function):
    """Identity on ``weight``; backward turns "no gradient" (the consumer added it to
    ``main_grad``) into the ready dummy, and passes a real gradient on unchanged."""

    @staticmethod
    def forward(ctx, weight):
        ctx.set_materialize_grads(False)
        ctx.weight = weight
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        return _ready_dummy(ctx.weight) if grad is None else grad


def _embedding_forward(module, input_):
    weight = module.weight
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return type(module).forward(module, input_)
    return _EmbeddingIntoMainGrad.apply(input_, weight, module.embedding_grad_gives_ready)


def lm_head_weight_and_grad_into(weight: torch.Tensor, vocab_size: int | None = None):
    """``(weight, kwargs)`` for the fused LM-head loss: ``weight`` sliced to ``vocab_size`` rows
    and, when the fusion is on for it (and autograd records), wrapped so DDP's hook still fires,
    with ``{"weight_grad_into": main_grad rows}``; else ``{}``."""
    def rows(t):  # padded rows stay out of the softmax
        return t if vocab_size is None else t[:vocab_size]

    if not (getattr(weight, LM_HEAD_ATTR, False) and torch.is_grad_enabled() and weight.requires_grad):
        return rows(weight), {}
    return rows(_MainGradReady.apply(weight)), {"weight_grad_into": rows(weight.main_grad)}


def _fusable(weight) -> bool:
    return (weight is not None and weight.requires_grad
            and getattr(weight, "main_grad", None) is not None and weight.main_grad.dtype == torch.float32)


def fuse_embedding_grad_accumulation(modules) -> int:
    """Send the gradients of megatron-core ``VocabParallelEmbedding`` weights (tensor-parallel size
    1) and of LM-head weights (``output_layer``'s, or the embedding's when tied) in ``modules``
    straight into their fp32 ``main_grad``. A tied LM head is switched only with its embedding;
    models with multi-token prediction (more uses of the weights) are left alone.
    Returns how many embeddings and LM-head weights were switched."""
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    subs = [m for root in modules for m in root.modules()]
    heads, skip = [], set()  # the weight each LM head on this rank uses; weights to leave alone
    for m in subs:
        if getattr(m, "post_process", False) and getattr(m, "output_layer", None) is not None:
            tied = getattr(m, "share_embeddings_and_output_weights", False)
            weight = m.shared_embedding_or_output_weight() if tied else m.output_layer.weight
            if weight is not None:
                (skip if getattr(getattr(m, "config", None), "mtp_num_layers", None) else heads).append(weight)
    head_ids, skip_ids = {id(w) for w in heads}, {id(w) for w in skip}

    switched, fused_tables = 0, set()
    for m in subs:
        w = getattr(m, "weight", None)
        if not (isinstance(m, VocabParallelEmbedding) and _fusable(w) and id(w) not in skip_ids
                and m.tp_group.size() == 1 and getattr(m, "gtp_remat_size", 1) == 1
                and not m.reduce_scatter_embeddings):
            continue
        shared = id(w) in head_ids
        if getattr(w, "zero_out_wgrad", False):
            if not shared:  # some other use of the weight that expects zero dummies: leave it
                continue
            # megatron sets it on tied weights so that DDP adds the LM head's zero dummy to the
            # embedding's real gradient; here the embedding returns none, and DDP must skip the
            # LM head's uninitialised dummy
            w.zero_out_wgrad = False
        m.embedding_grad_gives_ready = not shared  # tied: the LM head gives it
        m.forward = types.MethodType(_embedding_forward, m)
        fused_tables.add(id(w))
        switched += 1
    table_ids = {id(m.weight) for m in subs if isinstance(m, VocabParallelEmbedding)}
    for w in heads:
        if _fusable(w) and (id(w) not in table_ids or id(w) in fused_tables):
            setattr(w, LM_HEAD_ATTR, True)
            switched += 1
    return switched
