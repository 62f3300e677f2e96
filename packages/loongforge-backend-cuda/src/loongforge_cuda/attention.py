"""SDPA core attention whose kernel (cuDNN, flash, memory-efficient) is picked per shape by timing.

Which SDPA kernel is fastest depends on the shape: on an H100 at B=4, H=16, S=4096, D=128 causal,
fwd+bwd, torch's cuDNN backend ran at 415 TFLOP/s, flash at 247 and memory-efficient at 121, while
torch's own default order prefers flash. So the first call for each shape times every candidate
(forward + backward on random inputs of that shape, a few repetitions after a warm-up) and the
fastest that runs is used from then on. Grouped KV heads are tried natively (``enable_gqa``) and
with the KV heads repeated, since not every kernel takes them natively.

Registered attention kernels (the kernels package's Triton flash attention, as ``triton``) join
the timing through :meth:`MeasuredSDPAttention.with_kernels`.

``LOONGFORGE_SDPA_BACKEND=cudnn|flash|efficient|math|triton`` forces one kernel (for measurements).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from loongforge.modules.attention import SDPAttention

ENV_FORCE = "LOONGFORGE_SDPA_BACKEND"

#: (torch SDPBackend name, repeat KV heads) in preference order for ties
CANDIDATES: tuple[tuple[str, bool], ...] = (
    ("cudnn", False),
    ("cudnn", True),
    ("flash", False),
    ("flash", True),
    ("efficient", False),
    ("efficient", True),
)
_SDPB = {
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


def choose_fastest(candidates: Sequence, time_fn: Callable[[object], float]) -> tuple[object | None, dict]:
    """The candidate with the smallest ``time_fn`` (seconds); candidates whose ``time_fn`` raises
    ``RuntimeError`` (no kernel for this input) are skipped. Returns ``(best or None, {cand: time or
    the error text})``; ties keep the earlier candidate."""
    best, best_t, report = None, float("inf"), {}
    for cand in candidates:
        try:
            t = float(time_fn(cand))
        except RuntimeError as exc:
            report[cand] = f"unsupported: {str(exc).splitlines()[0][:120]}"
            continue
        report[cand] = t
        if t < best_t:
            best, best_t = cand, t
    return best, report


def sdpa(q, k, v, mask, causal, scale, dropout_p, backend: str | None, repeat_kv: bool, kernels=None):
    """SDPA on [b, h, s, d] with one kernel (``backend`` None: torch's choice; a name in
    ``kernels``: that registered kernel, ``fn(q, k, v, causal=, scale=)``, no mask or dropout)."""
    if kernels and backend in kernels:
        if mask is not None or dropout_p:
            raise RuntimeError(f"kernel {backend!r} takes no attention mask or dropout")
        return kernels[backend](q, k, v, causal=causal, scale=scale)
    if repeat_kv and k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    kwargs = dict(attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale,
                  enable_gqa=q.shape[1] != k.shape[1])
    if backend is None:
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with torch.nn.attention.sdpa_kernel([getattr(torch.nn.attention.SDPBackend, _SDPB[backend])]):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)


def _time_candidate(q, k, v, mask, causal, scale, cand, kernels, reps: int = 3) -> float:
    """Seconds per forward+backward of ``cand`` on fresh random inputs laid out like q, k, v."""
    backend, repeat = cand
    leaves = [torch.randn_like(t).requires_grad_(True) for t in (q, k, v)]  # same strides as the model's
    with torch.enable_grad():
        out = sdpa(*leaves, mask, causal, scale, 0.0, backend, repeat, kernels)  # warm-up; raises if unsupported
        grad = torch.randn_like(out)
        out.backward(grad)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            sdpa(*leaves, mask, causal, scale, 0.0, backend, repeat, kernels).backward(grad)
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


class MeasuredSDPAttention(SDPAttention):
    """``SDPAttention`` that, on CUDA, runs the attention kernel measured fastest for each shape:
    torch's SDPA kernels and the registered ones in :attr:`kernels` (see :meth:`with_kernels`)."""

    #: shape key -> (backend, repeat_kv) or None (torch's default); shared by all layers
    choices: dict = {}
    #: shape key -> {candidate: seconds or reason}, for logs and notes
    reports: dict = {}
    #: candidate name -> ``fn(q, k, v, causal=, scale=)``: registered attention kernels
    kernels: dict = {}

    @classmethod
    def with_kernels(cls, kernels: dict) -> type:
        """This class with registered attention kernels as further candidates."""
        kernels = {name: fn for name, fn in kernels.items() if fn is not None}
        return type(cls.__name__, (cls,), {"kernels": kernels}) if kernels else cls

    def _choice(self, q, k, mask, causal):
        forced = os.environ.get(ENV_FORCE, "").strip().lower()
        if forced:
            if forced not in _SDPB and forced not in self.kernels:
                raise ValueError(f"{ENV_FORCE}={forced!r}: expected one of {', '.join([*_SDPB, *self.kernels])}")
            return forced, False
        key = (tuple(q.shape), tuple(k.shape), q.dtype, causal, None if mask is None else tuple(mask.shape),
               tuple(self.kernels), self.dropout_p > 0 and self.training)
        if key not in self.choices:
            if key[-1]:  # dropout: every kernel draws its own random numbers; keep torch's choice
                best, report = None, {"dropout": "torch default"}
            else:
                grouped = k.shape[1] != q.shape[1]
                candidates = [c for c in CANDIDATES if grouped or not c[1]]  # repeating needs grouped KV
                candidates += [(name, False) for name in self.kernels]
                best, report = choose_fastest(
                    candidates,
                    lambda c: _time_candidate(q, k, k, mask, causal, self.softmax_scale, c, self.kernels),
                )
            type(self).choices[key], type(self).reports[key] = best, report
        return self.choices[key]

    def _sdpa(self, q, k, v, allowed, causal):
        if not q.is_cuda:
            return super()._sdpa(q, k, v, allowed, causal)
        choice = self._choice(q, k, allowed, causal)
        dropout = self.dropout_p if self.training else 0.0
        if choice is None:
            return sdpa(q, k, v, allowed, causal, self.softmax_scale, dropout, None, False)
        return sdpa(q, k, v, allowed, causal, self.softmax_scale, dropout, *choice, self.kernels)
