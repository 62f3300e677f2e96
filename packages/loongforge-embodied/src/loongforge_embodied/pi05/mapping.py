"""Weight mapping Pi0/Pi0.5 (ours) <-> lerobot's ``PI05Pytorch``/``PI0Pytorch`` and transformers'
``PI0ForConditionalGeneration``, as declarative rename rules.

A rule is ``(ours, theirs)``; ``{i}`` stands for a layer index and ``{*}`` for the rest of the name.
Every parameter is a plain rename (same tensor, same layout), so conversion both ways is
bit-identical. Reference keys that our model does not hold are listed in ``ignore`` (the tied or
unused ``lm_head``/``embed_tokens`` copies); exporting leaves them out, so a reference module
loads our export with ``strict=False`` and exactly those keys missing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

_VISION = [
    ("vision.vit.embeddings.{*}", "{V}.vision_tower.embeddings.{*}"),
    ("vision.vit.layers.{i}.{*}", "{V}.vision_tower.encoder.layers.{i}.{*}"),
    ("vision.post_layernorm.{*}", "{V}.vision_tower.post_layernorm.{*}"),
    ("projector.{*}", "{V}.multi_modal_projector.linear.{*}"),
    ("embed_tokens.weight", "{V}.language_model.embed_tokens.weight"),
    ("vlm_layers.{i}.{*}", "{V}.language_model.layers.{i}.{*}"),
    ("vlm_norm.{*}", "{V}.language_model.norm.{*}"),
]


def _rules(vlm: str, expert: str, heads: list[tuple[str, str]]) -> list[tuple[str, str]]:
    rules = [(o, t.replace("{V}", vlm)) for o, t in _VISION]
    rules += [("expert_layers.{i}.{*}", f"{expert}.layers.{{i}}.{{*}}"), ("expert_norm.{*}", f"{expert}.norm.{{*}}")]
    return rules + heads


_LR_HEADS = [(n + ".{*}", n + ".{*}") for n in ("action_in_proj", "action_out_proj", "state_proj",
                                                 "action_time_mlp_in", "action_time_mlp_out",
                                                 "time_mlp_in", "time_mlp_out")]
_HF_HEADS = [(n + ".{*}", "embed_action_time." + n + ".{*}") for n in ("action_in_proj", "state_proj",
                                                                      "action_time_mlp_in", "action_time_mlp_out")]
_HF_HEADS.append(("action_out_proj.{*}", "action_out_proj.{*}"))


def _regex(pattern: str) -> re.Pattern:
    out = re.escape(pattern).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{\*\}", r"(?P<rest>.+)")
    return re.compile(out + "$")


@dataclass(frozen=True)
class PiMapping:
    rules: tuple[tuple[str, str], ...]
    ignore: tuple[str, ...] = ()
    name: str = ""

    def _convert(self, name: str, src: int) -> str | None:
        for rule in self.rules:
            m = _regex(rule[src]).match(name)
            if m:
                g = m.groupdict()
                out = rule[1 - src]
                if "i" in g:
                    out = out.replace("{i}", g["i"])
                if "rest" in g:
                    out = out.replace("{*}", g["rest"])
                return out
        return None

    def ignored(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.ignore)

    def to_theirs(self, ours: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in ours.items():
            t = self._convert(k, 0)
            if t is None:
                raise KeyError(f"{self.name}: no rule maps our parameter {k!r}")
            out[t] = v
        return out

    def to_ours(self, theirs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in theirs.items():
            if self.ignored(k):
                continue
            o = self._convert(k, 1)
            if o is None:
                raise KeyError(f"{self.name}: no rule maps the reference parameter {k!r}")
            out[o] = v
        return out


def lerobot_mapping(prefix: str = "") -> PiMapping:
    """lerobot ``PI0Pytorch``/``PI05Pytorch`` names (``prefix='model.'`` for a ``PI05Policy``
    state dict / checkpoint)."""
    p = prefix + "paligemma_with_expert."
    rules = _rules(p + "paligemma.model", p + "gemma_expert.model", [(o, prefix + t) for o, t in _LR_HEADS])
    return PiMapping(tuple(rules), ignore=(re.escape(p) + r"paligemma\.lm_head\.weight",
                                           re.escape(p) + r"gemma_expert\.lm_head\.weight"), name="lerobot pi0/pi05")


def hf_pi0_mapping() -> PiMapping:
    """transformers ``PI0ForConditionalGeneration`` names (Pi0 only: transformers has no Pi0.5)."""
    return PiMapping(tuple(_rules("model.vlm", "model.dit", _HF_HEADS)),
                     ignore=(r"model\.dit\.embed_tokens\.weight",), name="transformers PI0")


def save_ours(model_state: Mapping[str, torch.Tensor], path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in model_state.items()}, str(path))


def convert_file(src, dst, mapping: PiMapping, direction: str) -> None:
    """Convert a safetensors file: ``direction`` 'to_ours' or 'to_theirs'."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    out = mapping.to_ours(tensors) if direction == "to_ours" else mapping.to_theirs(tensors)
    save_file({k: v.contiguous() for k, v in out.items()}, str(dst))
