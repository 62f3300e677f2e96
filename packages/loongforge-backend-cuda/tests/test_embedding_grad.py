"""Embedding / LM-head weight gradients straight into megatron-core DDP's fp32 ``main_grad``, on a
real bf16 GPTModel in DDP (one gloo rank) with the fused LM-head loss (Triton, interpreted on CPU):
each contribution lands in ``main_grad`` exactly once, DDP's hooks still fire (overlapped grad
reduce asserts they did), and training matches the unfused path."""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import pytest
import torch
from loongforge.testing import megatron_adam, single_process_megatron
from loongforge_cuda import embedding_grad
from loongforge_cuda.embedding_grad import (
    LM_HEAD_ATTR,
    fuse_embedding_grad_accumulation,
    lm_head_weight_and_grad_into,
)
from loongforge_cuda.modules import fused_ce_output_processor
from loongforge_kernels.fused_linear_ce import fused_linear_cross_entropy

VOCAB, SEQ, BATCH, MICRO_BATCHES, STEPS = 96, 16, 2, 2, 3


def _gpt(tied: bool, overlap: bool):
    """``tiny_bf16_gpt``'s model, with the DDP grad-reduce overlap chosen."""
    from loongforge.modules.layer_spec import local_sdpa_spec
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                               bf16=True, params_dtype=torch.bfloat16, hidden_dropout=0.0,
                               attention_dropout=0.0, normalization="RMSNorm", gated_linear_unit=True)
    model = GPTModel(config, local_sdpa_spec(config), vocab_size=VOCAB, max_sequence_length=SEQ,
                     share_embeddings_and_output_weights=tied)
    if torch.cuda.is_available():  # the GPU test's NCCL world: every parameter on the device
        model = model.cuda()
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap)
    return DistributedDataParallel(config, ddp_config, Float16Module(config, model)), model


def train(fused: bool, tied: bool, overlap: bool, monkeypatch, world, real_vocab: int | None = None,
          fused_head: bool = True):
    """``STEPS`` Adam steps of ``MICRO_BATCHES`` micro-batches each, inside ``world()`` (a
    megatron world of one rank, seeded), on tokens below ``real_vocab`` (the loss over as many
    output rows, as ``PositionIdsGPTModel`` passes it; None: all); ``fused_head`` False: megatron's
    own output layer and loss instead of the fused loss. Returns the per-step losses,
    the first step's ``main_grad``s and, when fused, that step's embedding / LM-head contributions
    recomputed apart (the LM head's by the same kernel into a zero buffer, the embedding's rows
    scattered from the gradient of its output) and summed in the order ``main_grad`` receives them."""
    # a NaN dummy: if DDP's hook added a ready dummy, main_grad would show it
    real_dummy = embedding_grad._ready_dummy
    monkeypatch.setattr(embedding_grad, "_ready_dummy", lambda w: real_dummy(w).fill_(math.nan))
    pieces = []

    def ce(hidden, weight, labels, **kw):
        loss = fused_linear_cross_entropy(hidden, weight, labels, **kw)
        assert ("weight_grad_into" in kw) is fused
        saved = (hidden.detach(), weight.detach().clone(), labels)
        loss.register_hook(lambda g: pieces.append(("lm", *saved, g.clone())))
        return loss

    def on_embedding(module, args, out):
        out.register_hook(lambda g: pieces.append(("embedding", args[0], g.clone())))

    with world():
        ddp, model = _gpt(tied, overlap)
        table = model.embedding.word_embeddings
        head = table.weight if tied else model.output_layer.weight
        if fused:
            assert fuse_embedding_grad_accumulation([ddp]) == 2  # the table and the LM-head weight
            assert getattr(head, LM_HEAD_ATTR) and table.embedding_grad_gives_ready is not tied
        table.register_forward_hook(on_embedding)
        optimizer = megatron_adam(ddp, lr=1e-2, clip_grad=1.0)
        processor = functools.partial(fused_ce_output_processor(ce), vocab_size=real_vocab) if fused_head else None
        tokens = torch.randint(0, real_vocab or VOCAB, (STEPS, MICRO_BATCHES, BATCH, SEQ + 1),
                               generator=torch.Generator().manual_seed(3))
        device = table.weight.device
        positions = torch.arange(SEQ, device=device).expand(BATCH, SEQ)
        losses, main_grads, expected = [], None, {}
        for step in range(STEPS):
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            pieces.clear()
            step_loss = 0.0
            for mb in range(MICRO_BATCHES):
                t = tokens[step, mb].to(device)
                loss = ddp(t[:, :-1], positions, None, labels=t[:, 1:], output_processor=processor)
                loss = loss.float().mean() / MICRO_BATCHES
                loss.backward()
                step_loss += loss.item()
                assert all(p.grad is None for p in ddp.parameters())  # DDP's hook took every grad
                if fused and fused_head:
                    assert table.weight.grad_added_to_main_grad and head.grad_added_to_main_grad
            ddp.finish_grad_sync()  # with overlap, asserts every parameter was marked ready
            if step == 0:
                main_grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
                if fused and fused_head:
                    expected = _contributions(pieces, table.weight, head)
            losses.append(step_loss)
            ok, _, _ = optimizer.step()
            assert ok
        return losses, main_grads, expected


def _contributions(pieces, table, head):
    """Each micro-batch's LM-head and embedding contributions (in backward order), summed in that
    order into a zero buffer per weight, and apart."""
    in_order = {id(table): torch.zeros_like(table.main_grad), id(head): torch.zeros_like(head.main_grad)}
    table_only, head_only = torch.zeros_like(table.main_grad), torch.zeros_like(head.main_grad)
    for kind, *rest in pieces:
        if kind == "lm":
            hidden, weight, labels, upstream = rest
            for into in (in_order[id(head)], head_only):
                w = weight.clone().requires_grad_(True)  # the first real_vocab rows
                fused_linear_cross_entropy(hidden, w, labels, reduction="none",
                                           weight_grad_into=into[:len(w)]).backward(upstream)
        else:
            ids, grad = rest
            rows = grad.reshape(-1, grad.shape[-1]).float()
            for into in (in_order[id(table)], table_only):
                if into.is_cuda:  # sorted: deterministic
                    into.index_put_((ids.reshape(-1),), rows, accumulate=True)
                else:  # index_put_ adds with parallel atomics on the CPU
                    into.index_add_(0, ids.reshape(-1), rows)
    return in_order[id(table)], in_order[id(head)], table_only, head_only


def check_against_unfused(tied, overlap, monkeypatch, world, real_vocab=None, exact_elsewhere=True):
    ref_losses, ref_grads, _ = train(False, tied, overlap, monkeypatch, world, real_vocab)
    losses, grads, (table_in_order, head_in_order, table_only, head_only) = train(
        True, tied, overlap, monkeypatch, world, real_vocab)
    table_name = "embedding.word_embeddings.weight"
    head_name = table_name if tied else "output_layer.weight"
    # what the two paths put there, each exactly once (same ops in the same order: bit for bit)
    assert torch.equal(grads[table_name], table_in_order)
    assert torch.equal(grads[head_name], head_in_order)
    assert table_only.abs().sum() > 0 and head_only.abs().sum() > 0
    # the forward and every other gradient are untouched (bit for bit on the first step where the
    # backward is deterministic)
    for name, ref in ref_grads.items():
        if name in (table_name, head_name):
            # the unfused path rounds each contribution (and their sum) to bf16; ours stays fp32
            torch.testing.assert_close(grads[name], ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item(),
                                       msg=lambda m, name=name: f"{name}: {m}")
        elif exact_elsewhere:
            assert torch.equal(grads[name], ref), name
        else:
            torch.testing.assert_close(grads[name], ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())
    assert losses[0] == ref_losses[0] if exact_elsewhere else losses[0] == pytest.approx(ref_losses[0], rel=1e-6)
    # so training follows the same path, within those roundings fed through Adam
    assert losses == pytest.approx(ref_losses, rel=2e-3)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs Triton's CPU interpreter")
@pytest.mark.parametrize("tied, overlap, real_vocab", [(True, False, None), (True, True, None),
                                                       (False, False, None), (False, True, None),
                                                       (True, True, VOCAB - 5)])
def test_embedding_and_lm_head_grads_into_main_grad(tied, overlap, real_vocab, monkeypatch):
    monkeypatch.setenv("LOONGFORGE_KERNELS_IMPL", "triton")
    check_against_unfused(tied, overlap, monkeypatch, lambda: single_process_megatron(seed=5), real_vocab)


@pytest.mark.parametrize("overlap", [False, True])
def test_tied_embedding_with_megatron_output_layer(overlap, monkeypatch):
    """The fused embedding next to megatron's own (unfused) LM head, e.g. with the fused loss
    disabled: the head's real gradient still reaches ``main_grad`` through DDP's hook."""
    world = lambda: single_process_megatron(seed=5)  # noqa: E731
    ref_losses, ref_grads, _ = train(False, True, overlap, monkeypatch, world, fused_head=False)
    losses, grads, _ = train(True, True, overlap, monkeypatch, world, fused_head=False)
    name = "embedding.word_embeddings.weight"
    for n, ref in ref_grads.items():
        if n == name:  # the embedding's part stays fp32 here, the head's is bf16 on both
            torch.testing.assert_close(grads[n], ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
        else:
            assert torch.equal(grads[n], ref), n
    assert losses[0] == ref_losses[0]
    assert losses == pytest.approx(ref_losses, rel=2e-3)


def test_without_ddp_nothing_is_switched():
    from megatron.core.tensor_parallel import VocabParallelEmbedding
    from megatron.core.transformer import TransformerConfig

    with single_process_megatron():
        config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2)
        table = VocabParallelEmbedding(16, 8, init_method=torch.nn.init.normal_, config=config)
        assert fuse_embedding_grad_accumulation([table]) == 0
        assert "forward" not in vars(table)
        assert lm_head_weight_and_grad_into(table.weight, 10)[1] == {}
