"""Weight rules of MoE layers: the router and the experts in :class:`GroupedExperts`' layout.

HF checkpoints store each expert separately (``mlp.experts.{e}.gate_proj.weight`` [I, H],
``up_proj`` [I, H], ``down_proj`` [H, I]); transformers 5 keeps them fused in memory
(``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]) and writes the
per-expert names on ``save_pretrained``. The rules read per-expert names; :func:`per_expert_getter`
serves them from either layout.

A rule is built for the experts of one expert-parallel rank (``experts``: their global indices)
and one expert-tensor-parallel rank, so a loader asks only for its own experts' tensors
(``WeightMapping.hf_names``). Expert weights are not cut over the (attention) tensor-parallel
ranks: their ``shard`` is the identity. :func:`merge_expert_shards` puts the parts of several
EP/ETP ranks back together.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from loongforge.weight_mapping import FusedGateUp, MappingError, Rename, Rule

EXPERT = "{e}"
_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<which>gate|up|down)_proj\.weight$")


def _names(pattern: str, experts: Sequence[int]) -> list[str]:
    return [pattern.replace(EXPERT, str(e)) for e in experts]


@dataclass(frozen=True, kw_only=True)
class _ExpertRule(Rule):
    #: global indices of the experts this rank holds, in order
    experts: tuple[int, ...] = ()
    etp_rank: int = 0
    etp_size: int = 1

    def shard(self, full, tp_rank, tp_size, name):
        return full  # experts are split over EP/ETP (in the rule), not over attention TP

    def merge(self, shards, name):
        first = shards[0]
        if any(not torch.equal(s, first) for s in shards[1:]):
            raise MappingError(f"parameter {name!r}: expert weights differ across tensor-parallel ranks "
                               "(use merge_expert_shards for expert-tensor-parallel parts)")
        return first

    def _part(self, t: torch.Tensor, dim: int, name: str) -> torch.Tensor:
        if self.etp_size == 1:
            return t
        if t.shape[dim] % self.etp_size:
            raise MappingError(f"parameter {name!r}: dim {dim} of {tuple(t.shape)} is not divisible by the "
                               f"expert tensor-parallel size {self.etp_size}")
        return t.chunk(self.etp_size, dim=dim)[self.etp_rank]


@dataclass(frozen=True, kw_only=True)
class ExpertsFc1(_ExpertRule):
    """``fc1_weight`` [E_local, 2 I_local, H]: per expert ``[gate; up]`` (this ETP rank's rows)."""

    hf_gate: str = ""
    hf_up: str = ""

    def hf_patterns(self):
        return tuple(n for e in self.experts for n in _names(self.hf_gate, [e]) + _names(self.hf_up, [e]))

    def combine(self, hf, name, layer=None):
        rows = []
        for e in self.experts:
            gate, up = hf[self.hf_gate.replace(EXPERT, str(e))], hf[self.hf_up.replace(EXPERT, str(e))]
            if gate.shape != up.shape or gate.dim() != 2:
                raise MappingError(f"parameter {name!r}: expert {e}'s gate_proj {tuple(gate.shape)} and up_proj "
                                   f"{tuple(up.shape)} must be equal 2-d shapes")
            rows.append(torch.cat([self._part(gate, 0, name), self._part(up, 0, name)]))
        return torch.stack(rows)

    def split(self, full, name):
        if self.etp_size != 1:
            raise MappingError(f"parameter {name!r}: export needs the full expert weights (merge ETP parts first)")
        out = {}
        for e, w in zip(self.experts, full, strict=True):
            gate, up = w.chunk(2, dim=0)
            out[self.hf_gate.replace(EXPERT, str(e))] = gate
            out[self.hf_up.replace(EXPERT, str(e))] = up
        return out


@dataclass(frozen=True, kw_only=True)
class ExpertsFc2(_ExpertRule):
    """``fc2_weight`` [E_local, H, I_local]: each expert's ``down_proj`` (this ETP rank's columns)."""

    hf_down: str = ""

    def hf_patterns(self):
        return tuple(_names(self.hf_down, self.experts))

    def combine(self, hf, name, layer=None):
        return torch.stack([self._part(hf[self.hf_down.replace(EXPERT, str(e))], 1, name) for e in self.experts])

    def split(self, full, name):
        if self.etp_size != 1:
            raise MappingError(f"parameter {name!r}: export needs the full expert weights (merge ETP parts first)")
        return {self.hf_down.replace(EXPERT, str(e)): w for e, w in zip(self.experts, full, strict=True)}


def local_experts(num_experts: int, ep_rank: int, ep_size: int) -> tuple[int, ...]:
    """Global indices of EP rank ``ep_rank``'s experts (megatron-core: contiguous blocks)."""
    if num_experts % ep_size:
        raise MappingError(f"{num_experts} experts cannot be split over expert-parallel size {ep_size}")
    n = num_experts // ep_size
    return tuple(range(ep_rank * n, (ep_rank + 1) * n))


def moe_layer_rules(hf_mlp: str, ours_mlp: str, *, num_experts: int, moe_layers: frozenset[int] | None,
                    ep_rank: int = 0, ep_size: int = 1, etp_rank: int = 0, etp_size: int = 1,
                    router: str = "gate.weight", grouped: bool = True) -> list[Rule]:
    """Router + experts of the MoE layers (``moe_layers``: their global indices; ``None``: all).
    ``hf_mlp``/``ours_mlp``: the MLP prefixes with ``{i}`` (``model.layers.{i}.mlp``).
    ``grouped``: :class:`GroupedExperts`' layout; ``False``: megatron's ``SequentialMLP``
    (``experts.local_experts.{j}.linear_fc1/linear_fc2``, whole experts only)."""
    experts = local_experts(num_experts, ep_rank, ep_size)
    router_rule = Rename(hf=f"{hf_mlp}.{router}", ours=f"{ours_mlp}.router.weight", only_layers=moe_layers)
    if not grouped:
        if etp_size != 1:
            raise MappingError("SequentialMLP expert weights are mapped for expert tensor-parallel size 1 only")
        hf_e = f"{hf_mlp}.experts.{EXPERT}"
        return [router_rule] + [rule for j, e in enumerate(experts) for rule in (
            FusedGateUp(hf_gate=f"{hf_e}.gate_proj.weight".replace(EXPERT, str(e)),
                        hf_up=f"{hf_e}.up_proj.weight".replace(EXPERT, str(e)),
                        ours=f"{ours_mlp}.experts.local_experts.{j}.linear_fc1.weight", only_layers=moe_layers),
            Rename(hf=f"{hf_e}.down_proj.weight".replace(EXPERT, str(e)),
                   ours=f"{ours_mlp}.experts.local_experts.{j}.linear_fc2.weight", only_layers=moe_layers))]
    where = {"only_layers": moe_layers, "experts": experts, "etp_rank": etp_rank, "etp_size": etp_size}
    return [
        router_rule,
        ExpertsFc1(hf_gate=f"{hf_mlp}.experts.{EXPERT}.gate_proj.weight", hf_up=f"{hf_mlp}.experts.{EXPERT}.up_proj.weight",
                   ours=f"{ours_mlp}.experts.fc1_weight", **where),
        ExpertsFc2(hf_down=f"{hf_mlp}.experts.{EXPERT}.down_proj.weight", ours=f"{ours_mlp}.experts.fc2_weight", **where),
    ]


def merge_expert_shards(name: str, parts: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """The full [E, ...] expert weight ``name`` (``fc1_weight`` or ``fc2_weight``) from
    ``parts[ep_rank][etp_rank]``: ETP parts joined per expert, EP ranks' experts stacked."""
    per_ep = []
    for etp_parts in parts:
        if name.endswith("fc1_weight"):
            halves = [p.chunk(2, dim=1) for p in etp_parts]
            per_ep.append(torch.cat([torch.cat([h[0] for h in halves], dim=1), torch.cat([h[1] for h in halves], dim=1)], dim=1))
        else:
            per_ep.append(torch.cat(list(etp_parts), dim=2))
    return torch.cat(per_ep, dim=0)


class _ExpertOfFused:
    """A lazy view of one expert's gate, up or down weight inside a fused safetensors slice."""

    def __init__(self, fused_slice, expert: int, which: str):
        self.fused, self.expert, self.which = fused_slice, expert, which

    def get_shape(self) -> list[int]:
        shape = list(self.fused.get_shape())[1:]
        if self.which != "down":
            shape[0] //= 2
        return shape

    def __getitem__(self, index):
        w = self.fused[self.expert:self.expert + 1][0]
        if self.which != "down":
            w = w.chunk(2, dim=0)[0 if self.which == "gate" else 1]
        return w[index]


def per_expert_getter(get: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """``get`` that also serves per-expert names (``...experts.{e}.gate_proj.weight``) from
    transformers 5's fused ``...experts.gate_up_proj`` [E, 2I, H] / ``...experts.down_proj``
    [E, H, I] when the checkpoint or state dict has those instead. Keeps ``get.slice``."""

    def fused_name(name: str):
        m = _PER_EXPERT.match(name)
        if m is None:
            return None
        which = m["which"]
        return f"{m['prefix']}.{'down_proj' if which == 'down' else 'gate_up_proj'}", int(m["e"]), which

    def getter(name: str) -> torch.Tensor:
        try:
            return get(name)
        except KeyError:
            fused = fused_name(name)
            if fused is None:
                raise
            tensor = get(fused[0])[fused[1]]
            return tensor if fused[2] == "down" else tensor.chunk(2, dim=0)[0 if fused[2] == "gate" else 1]

    inner_slice = getattr(get, "slice", None)
    if inner_slice is not None:
        def get_slice(name: str):
            try:
                return inner_slice(name)
            except KeyError:
                fused = fused_name(name)
                if fused is None:
                    raise
                return _ExpertOfFused(inner_slice(fused[0]), fused[1], fused[2])

        getter.slice = get_slice
    return getter
