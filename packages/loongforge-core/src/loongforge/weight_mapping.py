"""Declarative mapping between HuggingFace checkpoints and megatron-core parameters.

A model family describes its weights as a list of rules, one per parameter of our model (a name
pattern where ``{i}`` stands for the decoder layer)::

    rules = [
        VocabRows(hf="model.embed_tokens.weight", ours="embedding.word_embeddings.weight",
                  vocab_size=151936, padded_vocab_size=152064),
        FusedQKV(hf_q="model.layers.{i}.self_attn.q_proj.weight", hf_k=..., hf_v=...,
                 ours="decoder.layers.{i}.self_attention.linear_qkv.weight",
                 num_heads=16, num_query_groups=8, head_dim=128),
        Rename(hf="model.layers.{i}.self_attn.o_proj.weight",
               ours="decoder.layers.{i}.self_attention.linear_proj.weight", tp_dim=1),
        FusedGateUp(hf_gate=..., hf_up=..., ours="decoder.layers.{i}.mlp.linear_fc1.weight"),
        ...
    ]
    mapping = WeightMapping(rules, num_layers=28)

Every rule works in both directions and knows how its parameter is split over tensor-parallel
ranks:

* :meth:`WeightMapping.hf_to_ours` builds the tensors of one model chunk (one TP rank, the layers
  of one pipeline stage) from a tensor getter, so a loader can stream an HF checkpoint tensor by
  tensor (:meth:`WeightMapping.hf_names` lists what it will ask for); given a getter with lazy
  slices (:func:`safetensors_getter`), each TP rank reads only its own rows/columns from disk;
* :meth:`WeightMapping.ours_to_hf` turns a full (TP=1, all layers) state dict back into HF tensors;
* :meth:`WeightMapping.shard` / :meth:`WeightMapping.merge_tp` split a full parameter for a TP
  rank and merge per-rank shards back (the fused MLP input is not a plain concatenation).

megatron-core layouts the rules implement:

* ``linear_qkv`` (column parallel) stacks, per query group, the group's query heads then its key
  head then its value head: ``[g0: q.. k v | g1: q.. k v | ...]``; TP ranks own whole groups.
* ``linear_fc1`` of a gated MLP is ``[gate; up]`` on each rank, so rank ``r`` holds
  ``[gate_r; up_r]``.
* column-parallel weights split on dim 0, row-parallel weights (``linear_proj``, ``linear_fc2``)
  on dim 1, norms are replicated.
* embeddings and the output layer have ``padded_vocab_size`` rows (a multiple of the TP size);
  the rows past the real vocabulary are zero on import and dropped on export.

Parameter names follow megatron-core's local layer spec (``input_layernorm.weight``...);
:meth:`WeightMapping.for_te_spec` renames the norms fused into Transformer Engine linears
(``linear_qkv.layer_norm_weight``...) and :meth:`WeightMapping.matching` picks whichever a built
model uses.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loongforge.errors import LoongForgeError

__all__ = [
    "TE_NORM_NAMES",
    "FusedGateUp",
    "FusedQKV",
    "MappingError",
    "Rename",
    "Rule",
    "TiedOutput",
    "VocabRows",
    "WeightMapping",
    "load_into",
    "safetensors_getter",
]

LAYER = "{i}"

#: local-spec name -> Transformer Engine spec name, for norms TE fuses into the next linear
TE_NORM_NAMES: dict[str, str] = {
    "decoder.layers.{i}.input_layernorm.weight": "decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight",
    "decoder.layers.{i}.pre_mlp_layernorm.weight": "decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight",
}


class MappingError(LoongForgeError, ValueError):
    """A tensor has the wrong shape or cannot be split; the message names the parameter."""


def _fmt(pattern: str, layer: int | None) -> str:
    return pattern if layer is None else pattern.replace(LAYER, str(layer))


def _shape(t: torch.Tensor | Sequence[int]) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t)


def _check_divisible(size: int, tp_size: int, what: str, name: str) -> None:
    if size % tp_size:
        raise MappingError(f"parameter {name!r}: {what} ({size}) is not divisible by the tensor-parallel size {tp_size}")


def _chunk(t: torch.Tensor, dim: int, tp_rank: int, tp_size: int, name: str) -> torch.Tensor:
    _check_divisible(t.shape[dim], tp_size, f"dim {dim} of shape {_shape(t)}", name)
    return t.chunk(tp_size, dim=dim)[tp_rank]


def _read_part(hf_slice, dim: int, tp_rank: int, tp_size: int, name: str) -> torch.Tensor:
    """TP rank ``tp_rank``'s equal part along ``dim`` of a lazy safetensors slice."""
    shape = tuple(hf_slice.get_shape())
    _check_divisible(shape[dim], tp_size, f"dim {dim} of shape {shape}", name)
    n = shape[dim] // tp_size
    return hf_slice[(slice(None),) * dim + (slice(tp_rank * n, (tp_rank + 1) * n),)]


@dataclass(frozen=True, kw_only=True)
class Rule:
    """One parameter of our model, made of one or more HF tensors.

    ``ours`` is our parameter name (``{i}`` = decoder layer). ``stage`` says which pipeline
    stage holds it: ``"layer"`` (``{i}`` in the name), ``"embedding"`` (first stage) or
    ``"head"`` (last stage); ``"auto"`` infers it from the name.
    """

    ours: str
    #: global decoder layers that have this parameter (``None``: every layer); e.g. the experts
    #: of a model whose first layers are dense
    only_layers: frozenset[int] | None = None

    # --- overridden by subclasses -------------------------------------------------------------
    def hf_patterns(self) -> tuple[str, ...]:
        raise NotImplementedError

    def combine(self, hf: dict[str, torch.Tensor], name: str, layer: int | None = None) -> torch.Tensor:
        """The full (TP=1) parameter from its HF tensors (keyed by pattern; ``layer`` names them in errors)."""
        raise NotImplementedError

    def split(self, full: torch.Tensor, name: str) -> dict[str, torch.Tensor]:
        """The HF tensors (keyed by pattern) of a full parameter."""
        raise NotImplementedError

    def shard(self, full: torch.Tensor, tp_rank: int, tp_size: int, name: str) -> torch.Tensor:
        """TP rank ``tp_rank``'s part of the full parameter."""
        raise NotImplementedError

    def merge(self, shards: Sequence[torch.Tensor], name: str) -> torch.Tensor:
        """The full parameter from every TP rank's part (inverse of :meth:`shard`)."""
        raise NotImplementedError

    def _read_shard(self, hf_slices: dict, tp_rank: int, tp_size: int, name: str) -> torch.Tensor:
        """:meth:`shard` of :meth:`combine`, reading only what the rank needs from lazy slices."""
        return self.shard(self.combine({p: sl[:] for p, sl in hf_slices.items()}, name), tp_rank, tp_size, name)

    def read_shard(self, hf_slices: dict, tp_rank: int, tp_size: int, name: str, layer: int | None = None):
        """TP rank ``tp_rank``'s part from lazy HF slices (keyed by pattern; ``get_shape()`` and
        ``[a:b, ...]`` as safetensors' ``get_slice`` gives them), equal to ``shard(combine(...))``."""
        # the shape checks of combine, on meta tensors: errors name the HF tensor before any read
        self.combine({p: torch.empty(sl.get_shape(), device="meta") for p, sl in hf_slices.items()}, name, layer)
        return self._read_shard(hf_slices, tp_rank, tp_size, name)

    # --- common ------------------------------------------------------------------------------
    @property
    def per_layer(self) -> bool:
        return LAYER in self.ours

    @property
    def where(self) -> str:
        stage = getattr(self, "stage", "auto")
        if stage != "auto":
            return stage
        if self.per_layer:
            return "layer"
        return "embedding" if self.ours.startswith("embedding.") else "head"

    def exported(self) -> bool:
        """Whether :meth:`WeightMapping.ours_to_hf` writes this parameter."""
        return True


def _split_dim(t: torch.Tensor, dim: int | None, tp_rank: int, tp_size: int, name: str) -> torch.Tensor:
    if dim is None or tp_size == 1:
        return t
    return _chunk(t, dim, tp_rank, tp_size, name)


def _merge_dim(shards: Sequence[torch.Tensor], dim: int | None, name: str) -> torch.Tensor:
    if dim is None:
        first = shards[0]
        for s in shards[1:]:
            if not torch.equal(s, first):
                raise MappingError(f"parameter {name!r} is replicated across TP ranks but the shards differ")
        return first
    return torch.cat(list(shards), dim=dim)


@dataclass(frozen=True, kw_only=True)
class Rename(Rule):
    """A parameter that is one HF tensor under another name.

    ``tp_dim``: 0 for column-parallel weights/biases, 1 for row-parallel weights, ``None`` for
    replicated parameters (norms).
    """

    hf: str = ""
    tp_dim: int | None = None
    stage: str = "auto"

    def hf_patterns(self) -> tuple[str, ...]:
        return (self.hf,)

    def combine(self, hf, name, layer=None):
        return hf[self.hf]

    def split(self, full, name):
        return {self.hf: full}

    def shard(self, full, tp_rank, tp_size, name):
        return _split_dim(full, self.tp_dim, tp_rank, tp_size, name)

    def merge(self, shards, name):
        return _merge_dim(shards, self.tp_dim, name)

    def _read_shard(self, hf_slices, tp_rank, tp_size, name):
        sl = hf_slices[self.hf]
        return sl[:] if self.tp_dim is None or tp_size == 1 else _read_part(sl, self.tp_dim, tp_rank, tp_size, name)


@dataclass(frozen=True, kw_only=True)
class VocabRows(Rule):
    """Embedding or output-layer weight: ``vocab_size`` HF rows, ``padded_vocab_size`` of ours.

    Import appends zero rows up to ``padded_vocab_size`` (their logits are never compared with
    real tokens'); export drops them. Rows split over TP ranks like megatron-core's
    ``VocabParallelEmbedding`` and the column-parallel output layer.
    """

    hf: str = ""
    vocab_size: int = 0
    padded_vocab_size: int = 0
    stage: str = "auto"

    def hf_patterns(self) -> tuple[str, ...]:
        return (self.hf,)

    def combine(self, hf, name, layer=None):
        t = hf[self.hf]
        if t.shape[0] != self.vocab_size:
            raise MappingError(
                f"parameter {name!r} from HF {_fmt(self.hf, layer)!r}: expected {self.vocab_size} vocabulary rows "
                f"(config vocab_size), got shape {_shape(t)}"
            )
        if self.padded_vocab_size < self.vocab_size:
            raise MappingError(f"parameter {name!r}: padded_vocab_size {self.padded_vocab_size} < vocab_size {self.vocab_size}")
        pad = self.padded_vocab_size - self.vocab_size
        if pad:
            t = torch.cat([t, t.new_zeros((pad, *t.shape[1:]))], dim=0)
        return t

    def split(self, full, name):
        if full.shape[0] != self.padded_vocab_size:
            raise MappingError(
                f"parameter {name!r}: expected {self.padded_vocab_size} (padded) vocabulary rows, got shape {_shape(full)}"
            )
        return {self.hf: full[: self.vocab_size]}

    def shard(self, full, tp_rank, tp_size, name):
        return _split_dim(full, 0, tp_rank, tp_size, name)

    def merge(self, shards, name):
        return torch.cat(list(shards), dim=0)

    def _read_shard(self, hf_slices, tp_rank, tp_size, name):
        _check_divisible(self.padded_vocab_size, tp_size, "padded_vocab_size", name)
        n = self.padded_vocab_size // tp_size
        start, stop = tp_rank * n, (tp_rank + 1) * n
        rows = hf_slices[self.hf][min(start, self.vocab_size):min(stop, self.vocab_size)]
        pad = n - rows.shape[0]  # this rank's share of the zero padding rows
        return torch.cat([rows, rows.new_zeros((pad, *rows.shape[1:]))]) if pad else rows


@dataclass(frozen=True, kw_only=True)
class TiedOutput(VocabRows):
    """The output layer of a model whose output weight is its input embedding.

    megatron-core allocates ``output_layer.weight`` only on a last pipeline stage that does not
    also hold the embedding (it is then synchronised with the first stage's embedding), so this
    rule loads the HF embedding there and is skipped on export.
    """

    stage: str = "head"

    def exported(self) -> bool:
        return False


@dataclass(frozen=True, kw_only=True)
class FusedQKV(Rule):
    """megatron-core's fused ``linear_qkv`` weight or bias from HF's separate q/k/v projections.

    Layout (dim 0): for each of the ``num_query_groups`` groups, its ``num_heads //
    num_query_groups`` query heads, then its key head, then its value head, each ``head_dim``
    rows. TP rank ``r`` owns groups ``[r * G/tp, (r+1) * G/tp)``.
    """

    hf_q: str = ""
    hf_k: str = ""
    hf_v: str = ""
    num_heads: int = 0
    num_query_groups: int = 0
    head_dim: int = 0

    def hf_patterns(self) -> tuple[str, ...]:
        return (self.hf_q, self.hf_k, self.hf_v)

    @property
    def _heads_per_group(self) -> int:
        if self.num_heads % self.num_query_groups:
            raise MappingError(
                f"parameter {self.ours!r}: num_heads {self.num_heads} is not a multiple of num_query_groups {self.num_query_groups}"
            )
        return self.num_heads // self.num_query_groups

    def combine(self, hf, name, layer=None):
        q, k, v = hf[self.hf_q], hf[self.hf_k], hf[self.hf_v]
        g, hpg, d = self.num_query_groups, self._heads_per_group, self.head_dim
        for pattern, t, rows in ((self.hf_q, q, self.num_heads * d), (self.hf_k, k, g * d), (self.hf_v, v, g * d)):
            if t.shape[0] != rows or t.shape[1:] != q.shape[1:]:
                raise MappingError(
                    f"parameter {name!r} from HF {_fmt(pattern, layer)!r}: expected shape {(rows, *q.shape[1:])}, got {_shape(t)}"
                )
        rest = tuple(q.shape[1:])
        fused = torch.cat([q.reshape(g, hpg * d, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1)
        return fused.reshape(g * (hpg + 2) * d, *rest)

    def _groups(self, full: torch.Tensor, name: str) -> torch.Tensor:
        g, hpg, d = self.num_query_groups, self._heads_per_group, self.head_dim
        rows = g * (hpg + 2) * d
        if full.shape[0] != rows:
            raise MappingError(f"parameter {name!r}: expected {rows} rows (q/k/v of {g} groups), got shape {_shape(full)}")
        return full.reshape(g, (hpg + 2) * d, *full.shape[1:])

    def split(self, full, name):
        g, hpg, d = self.num_query_groups, self._heads_per_group, self.head_dim
        grouped = self._groups(full, name)
        rest = tuple(full.shape[1:])
        q, k, v = grouped.split([hpg * d, d, d], dim=1)
        return {
            self.hf_q: q.reshape(g * hpg * d, *rest),
            self.hf_k: k.reshape(g * d, *rest),
            self.hf_v: v.reshape(g * d, *rest),
        }

    def shard(self, full, tp_rank, tp_size, name):
        if tp_size == 1:
            return full
        grouped = self._groups(full, name)
        _check_divisible(self.num_query_groups, tp_size, "num_query_groups", name)
        part = grouped.chunk(tp_size, dim=0)[tp_rank]
        return part.reshape(-1, *full.shape[1:])

    def merge(self, shards, name):
        return torch.cat(list(shards), dim=0)

    def _read_shard(self, hf_slices, tp_rank, tp_size, name):
        _check_divisible(self.num_query_groups, tp_size, "num_query_groups", name)
        groups, hpg, d = self.num_query_groups // tp_size, self._heads_per_group, self.head_dim
        first = tp_rank * groups
        local = {self.hf_q: hf_slices[self.hf_q][first * hpg * d:(first + groups) * hpg * d],
                 self.hf_k: hf_slices[self.hf_k][first * d:(first + groups) * d],
                 self.hf_v: hf_slices[self.hf_v][first * d:(first + groups) * d]}
        # this rank's groups are a model of their own in the same layout
        return dataclasses.replace(self, num_heads=groups * hpg, num_query_groups=groups).combine(local, name)


@dataclass(frozen=True, kw_only=True)
class FusedGateUp(Rule):
    """megatron-core's gated-MLP ``linear_fc1`` (``[gate; up]`` on every TP rank)."""

    hf_gate: str = ""
    hf_up: str = ""

    def hf_patterns(self) -> tuple[str, ...]:
        return (self.hf_gate, self.hf_up)

    def combine(self, hf, name, layer=None):
        gate, up = hf[self.hf_gate], hf[self.hf_up]
        if gate.shape != up.shape:
            raise MappingError(
                f"parameter {name!r}: HF {_fmt(self.hf_gate, layer)!r} has shape {_shape(gate)} "
                f"but {_fmt(self.hf_up, layer)!r} has {_shape(up)}"
            )
        return torch.cat([gate, up], dim=0)

    def _halves(self, t: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if t.shape[0] % 2:
            raise MappingError(f"parameter {name!r}: [gate; up] needs an even number of rows, got shape {_shape(t)}")
        gate, up = t.chunk(2, dim=0)
        return gate, up

    def split(self, full, name):
        gate, up = self._halves(full, name)
        return {self.hf_gate: gate, self.hf_up: up}

    def shard(self, full, tp_rank, tp_size, name):
        if tp_size == 1:
            return full
        gate, up = self._halves(full, name)
        return torch.cat([_chunk(gate, 0, tp_rank, tp_size, name), _chunk(up, 0, tp_rank, tp_size, name)], dim=0)

    def _read_shard(self, hf_slices, tp_rank, tp_size, name):
        return torch.cat([_read_part(hf_slices[p], 0, tp_rank, tp_size, name) for p in (self.hf_gate, self.hf_up)])

    def merge(self, shards, name):
        halves = [self._halves(s, name) for s in shards]
        return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])], dim=0)


_LAYER_RE = re.compile(r"\.(\d+)\.")


class WeightMapping:
    """The rules of a model with ``num_layers`` decoder layers.

    ``ignore_hf``: regular expressions of HF tensor names deliberately not loaded (e.g. extra
    multi-token-prediction layers); :meth:`unmapped_hf` reports any other leftover.
    """

    def __init__(self, rules: Iterable[Rule], num_layers: int, *, ignore_hf: Iterable[str] = ()):
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.num_layers = int(num_layers)
        self.ignore_hf: tuple[str, ...] = tuple(ignore_hf)
        seen: set[str] = set()
        for rule in self.rules:
            if rule.ours in seen:
                raise ValueError(f"two rules produce parameter {rule.ours!r}")
            seen.add(rule.ours)
        self._by_ours = {r.ours: r for r in self.rules}

    def __repr__(self) -> str:
        return f"WeightMapping({len(self.rules)} rules, num_layers={self.num_layers})"

    # --- selection -----------------------------------------------------------------------------
    def _layers(self, layers: Iterable[int] | None, layer_offset: int, num_local_layers: int | None) -> list[int]:
        if layers is None:
            count = self.num_layers - layer_offset if num_local_layers is None else num_local_layers
            layers = range(layer_offset, layer_offset + count)
        out = list(layers)
        bad = [i for i in out if not 0 <= i < self.num_layers]
        if bad:
            raise MappingError(f"layer indices {bad} are outside the model's {self.num_layers} layers")
        return out

    def _selected(self, layers: list[int], pre_process: bool, post_process: bool, *, exporting: bool = False):
        """(rule, global layer or None, local layer or None) for the parameters of one chunk."""
        for rule in self.rules:
            where = rule.where
            if where == "layer":
                for local, layer in enumerate(layers):
                    if rule.only_layers is None or layer in rule.only_layers:
                        yield rule, layer, local
            elif exporting:
                if rule.exported():
                    yield rule, None, None
            elif where == "embedding" and pre_process:
                yield rule, None, None
            elif where == "head" and post_process:
                if isinstance(rule, TiedOutput) and pre_process:
                    continue  # shares the embedding's weight on this stage
                yield rule, None, None

    # --- names ---------------------------------------------------------------------------------
    def hf_names(
        self,
        layers: Iterable[int] | None = None,
        *,
        layer_offset: int = 0,
        num_local_layers: int | None = None,
        pre_process: bool = True,
        post_process: bool = True,
    ) -> list[str]:
        """The HF tensors :meth:`hf_to_ours` reads for a chunk (default: the whole model), in order."""
        names: dict[str, None] = {}
        for rule, layer, _ in self._selected(self._layers(layers, layer_offset, num_local_layers), pre_process, post_process):
            for p in rule.hf_patterns():
                names.setdefault(_fmt(p, layer))
        return list(names)

    def ours_names(
        self,
        layers: Iterable[int] | None = None,
        *,
        layer_offset: int = 0,
        num_local_layers: int | None = None,
        pre_process: bool = True,
        post_process: bool = True,
    ) -> list[str]:
        """Our parameter names of a chunk, numbered locally (``decoder.layers.0`` = its first layer)."""
        sel = self._selected(self._layers(layers, layer_offset, num_local_layers), pre_process, post_process)
        return [_fmt(rule.ours, local) for rule, _, local in sel]

    def unmapped_hf(self, hf_names: Iterable[str]) -> list[str]:
        """Names among ``hf_names`` that no rule reads and ``ignore_hf`` does not cover."""
        known = set(self.hf_names())
        return [n for n in hf_names if n not in known and not any(re.fullmatch(p, n) for p in self.ignore_hf)]

    # --- conversion ----------------------------------------------------------------------------
    def hf_to_ours(
        self,
        get_hf_tensor: Callable[[str], torch.Tensor],
        tp_rank: int = 0,
        tp_size: int = 1,
        *,
        layers: Iterable[int] | None = None,
        layer_offset: int = 0,
        num_local_layers: int | None = None,
        pre_process: bool = True,
        post_process: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Our parameters of one chunk from HF tensors.

        ``layers``: the global indices of the chunk's decoder layers, in order (or
        ``layer_offset``/``num_local_layers``); the result numbers them locally from 0, as the
        chunk's ``decoder.layers`` does. ``pre_process``/``post_process``: whether the chunk holds
        the embedding / the final norm and output layer.
        """
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank {tp_rank} is outside tp_size {tp_size}")
        get_slice = getattr(get_hf_tensor, "slice", None) if tp_size > 1 else None
        out: dict[str, torch.Tensor] = {}
        for rule, layer, local in self._selected(self._layers(layers, layer_offset, num_local_layers), pre_process, post_process):
            name, where = _fmt(rule.ours, local), _fmt(rule.ours, layer)
            if get_slice is not None:  # read only this rank's rows/columns
                hf_slices = {p: get_slice(_fmt(p, layer)) for p in rule.hf_patterns()}
                out[name] = rule.read_shard(hf_slices, tp_rank, tp_size, where, layer).contiguous()
                continue
            hf = {p: get_hf_tensor(_fmt(p, layer)) for p in rule.hf_patterns()}
            out[name] = rule.shard(rule.combine(hf, where, layer), tp_rank, tp_size, where).contiguous()
        return out

    def ours_to_hf(
        self, get_our_tensor: Callable[[str], torch.Tensor], *, layers: Iterable[int] | None = None
    ) -> dict[str, torch.Tensor]:
        """HF tensors from our full (TP=1) parameters, named with global layer indices."""
        out: dict[str, torch.Tensor] = {}
        for rule, layer, _ in self._selected(self._layers(layers, 0, None), True, True, exporting=True):
            name = _fmt(rule.ours, layer)
            for p, t in rule.split(get_our_tensor(name), name).items():
                out[_fmt(p, layer)] = t.contiguous()
        return out

    # --- tensor parallelism on our side ------------------------------------------------------
    def rule_for(self, our_name: str) -> tuple[Rule, int | None]:
        """The rule producing ``our_name`` and the layer index in the name (``None`` outside layers)."""
        if our_name in self._by_ours:
            return self._by_ours[our_name], None
        for m in _LAYER_RE.finditer(our_name):
            pattern = our_name[: m.start()] + ".{i}." + our_name[m.end():]
            if pattern in self._by_ours:
                return self._by_ours[pattern], int(m.group(1))
        raise KeyError(f"no rule produces parameter {our_name!r}")

    def shard(self, our_name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
        """TP rank ``tp_rank``'s part of our full parameter ``our_name``."""
        return self.rule_for(our_name)[0].shard(full, tp_rank, tp_size, our_name)

    def merge_tp(self, our_name: str, shards: Sequence[torch.Tensor]) -> torch.Tensor:
        """Our full parameter ``our_name`` from the parts of TP ranks 0..n-1."""
        return self.rule_for(our_name)[0].merge(shards, our_name)

    # --- naming variants ---------------------------------------------------------------------
    def renamed(self, names: Mapping[str, str]) -> WeightMapping:
        """A copy whose rules produce ``names[ours]`` instead of ``ours``."""
        rules = [dataclasses.replace(r, ours=names.get(r.ours, r.ours)) for r in self.rules]
        return WeightMapping(rules, self.num_layers, ignore_hf=self.ignore_hf)

    def for_te_spec(self) -> WeightMapping:
        """Names of megatron-core's Transformer Engine spec (norms fused into the linears)."""
        return self.renamed(TE_NORM_NAMES)

    def matching(self, param_names: Iterable[str]) -> WeightMapping:
        """This mapping, or :meth:`for_te_spec`, whichever names ``param_names`` (a built model's) use."""
        if any(n.endswith(".layer_norm_weight") for n in param_names):
            return self.for_te_spec()
        return self


def load_into(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], *, strict: bool = True) -> list[str]:
    """Copy ``tensors`` into ``module``'s parameters (converting dtype/device), checking shapes.

    Returns the names of parameters that got no tensor (an error when ``strict``). A tensor
    without a parameter, or of another shape, raises :class:`MappingError` naming it.
    """
    params = dict(module.named_parameters())
    unexpected = [n for n in tensors if n not in params]
    if unexpected:
        raise MappingError(f"tensors for parameters the model does not have: {unexpected[:8]} (model has e.g. {list(params)[:4]})")
    with torch.no_grad():
        for name, t in tensors.items():
            p = params[name]
            if tuple(p.shape) != tuple(t.shape):
                raise MappingError(f"parameter {name!r}: expected shape {tuple(p.shape)}, got {tuple(t.shape)}")
            p.copy_(t.to(dtype=p.dtype, device=p.device))
    missing = [n for n in params if n not in tensors]
    if strict and missing:
        raise MappingError(f"no tensor for parameters {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return missing


def safetensors_getter(path: str | os.PathLike) -> Callable[[str], torch.Tensor]:
    """A tensor getter over an HF checkpoint directory (``model.safetensors`` or sharded with
    ``model.safetensors.index.json``) or a single ``.safetensors`` file; opens files lazily.
    ``getter.slice(name)`` gives safetensors' lazy slice, for reading one TP rank's part."""
    from safetensors import safe_open

    path = os.fspath(path)
    if os.path.isfile(path):
        files = {None: path}
        where: dict[str, str] | None = None
    else:
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                where = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
            files = {}
        else:
            single = os.path.join(path, "model.safetensors")
            if not os.path.exists(single):
                raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
            files, where = {None: single}, None
    handles: dict[str, Any] = {}

    def handle(name: str):
        file = files[None] if where is None else where.get(name)
        if file is None:
            raise KeyError(f"HF checkpoint {path} has no tensor {name!r}")
        if file not in handles:
            try:
                handles[file] = safe_open(file, framework="pt")
            except Exception as exc:  # safetensors' own error type, e.g. a truncated file
                raise MappingError(f"{file}: cannot read tensor {name!r}: {exc} (truncated or corrupt file?)") from exc
        return handles[file]

    def get(name: str) -> torch.Tensor:
        h = handle(name)
        try:
            return h.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error type for missing keys
            raise KeyError(f"HF checkpoint {path} has no tensor {name!r}") from exc

    def get_slice(name: str):
        """A lazy view: ``[a:b, ...]`` reads only those elements from the file."""
        h = handle(name)
        try:
            return h.get_slice(name)
        except Exception as exc:
            raise KeyError(f"HF checkpoint {path} has no tensor {name!r}") from exc

    get.slice = get_slice
    return get
