"""Context parallelism over video tokens: Ulysses (all-to-all over heads) or all-gather of K/V.

A sample's ``S`` tokens are cut into ``cp`` contiguous parts, part ``r`` on CP rank ``r``
(:func:`split_tokens`). Everything but self-attention is per token, so it runs on the local part
unchanged (the text context is replicated; cross-attention needs no communication). Around
self-attention one all-to-all turns ``[B, S/cp, H, D]`` (all heads, local tokens) into
``[B, S, H/cp, D]`` (all tokens, local heads); attention runs over the whole sequence with the full
``[B, 1, S, S]`` mask of packed clips; a second all-to-all brings ``[B, S/cp, H, D]`` back. Both are
``torch.distributed.nn.functional.all_to_all`` (differentiable: the backward is the reverse
all-to-all). Heads (after TP) must be divisible by ``cp``.

``mode="all_gather"`` instead all-gathers keys and values over the CP group (the backward sums
each rank's key/value gradients back to their owner) and attends with the local queries only,
using the local rows of the full mask; it has no head-count constraint but holds all keys/values.
"""

from __future__ import annotations

import torch


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group) -> torch.Tensor:
    from torch.distributed.nn.functional import all_to_all

    cp = group.size()
    inputs = [t.contiguous() for t in x.chunk(cp, dim=scatter_dim)]
    outputs = [torch.empty_like(inputs[0]) for _ in range(cp)]
    return torch.cat(all_to_all(outputs, inputs, group=group), dim=gather_dim)


def ulysses_attention(attend, q, k, v, mask, group):
    """``attend(q, k, v, mask)`` over the full sequence for local-token inputs ``[B, S/cp, H, D]``."""
    if q.shape[2] % group.size():
        raise ValueError(f"Ulysses CP: {q.shape[2]} local heads are not divisible by cp={group.size()}")
    q, k, v = (_all_to_all(t, 2, 1, group) for t in (q, k, v))
    out = attend(q, k, v, mask)
    return _all_to_all(out, 1, 2, group)


def all_gather_attention(attend, q, k, v, mask, group):
    """``attend`` of local queries ``[B, S/cp, H, D]`` against the keys/values of every CP rank."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    k, v = (torch.cat(all_gather(t.contiguous(), group=group), dim=1) for t in (k, v))
    if mask is not None:
        rows = q.shape[1]
        r = dist.get_rank(group)
        mask = mask[:, :, r * rows:(r + 1) * rows]
    return attend(q, k, v, mask)


def split_tokens(x: torch.Tensor, cp_rank: int, cp_size: int, dim: int = 1) -> torch.Tensor:
    """CP rank ``cp_rank``'s contiguous part of ``x`` along ``dim`` (the token dimension)."""
    if x.shape[dim] % cp_size:
        raise ValueError(f"context parallelism: {x.shape[dim]} tokens are not divisible by cp={cp_size} "
                         "(choose diffusion.buckets / num_frames so the token count is a multiple of parallel.cp)")
    return x.chunk(cp_size, dim=dim)[cp_rank]


MODES = ("ulysses", "all_gather")


def enable(model: torch.nn.Module, group, mode: str = "ulysses") -> None:
    """Route every self-attention of ``model`` through CP over ``group`` (None: off)."""
    from loongforge_diffusion.wan.model import Attention

    if mode not in MODES:
        raise ValueError(f"context parallel mode {mode!r}: one of {', '.join(MODES)}")
    for m in model.modules():
        if isinstance(m, Attention) and not m.cross:
            m.cp_group = group if group is not None and group.size() > 1 else None
            m.cp_mode = mode
