"""diffusers ``WanTransformer3DModel`` <-> our :class:`~loongforge_diffusion.wan.model.WanDiT` weights.

A declarative list of the core's :mod:`loongforge.weight_mapping` rules (so TP sharding and lazy
per-rank reads come with it): one rule per parameter, ``{i}`` = block. The self-attention's q/k/v
are megatron's fused ``linear_qkv`` (``FusedQKV`` with one group per head), the cross-attention's
k/v a fused ``[k; v]`` (``FusedGateUp``: ``[k_r; v_r]`` on TP rank r). Column-parallel weights and
biases (q/k/v, MLP in) and the q/k norms split on dim 0, row-parallel weights
(attention out, MLP out) on dim 1; everything else is replicated.

Checkpoint files: a diffusers transformer folder holds ``config.json`` and
``diffusion_pytorch_model.safetensors`` (or ``...safetensors.index.json`` + shards). Ours holds
``wan_config.json`` (:class:`WanConfig` incl. pipeline fields) and ``model.safetensors`` with our names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from loongforge.weight_mapping import FusedGateUp, FusedQKV, Rename, WeightMapping

from loongforge_diffusion.wan.config import WanConfig

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
OUR_CONFIG, OUR_WEIGHTS = "wan_config.json", "model.safetensors"


def _wb(ours: str, hf: str, tp_dim: int | None = None, bias_tp_dim: int | None = None, bias: bool = True):
    rules = [Rename(ours=f"{ours}.weight", hf=f"{hf}.weight", tp_dim=tp_dim)]
    if bias:
        rules.append(Rename(ours=f"{ours}.bias", hf=f"{hf}.bias", tp_dim=bias_tp_dim))
    return rules


def rules(wan: WanConfig) -> list[Rename]:
    r: list[Rename] = []
    r += _wb("patch_embedding", "patch_embedding")
    for n in ("linear_1", "linear_2"):
        r += _wb(f"time_embedder.{n}", f"condition_embedder.time_embedder.{n}")
        r += _wb(f"text_embedder.{n}", f"condition_embedder.text_embedder.{n}")
    r += _wb("time_proj", "condition_embedder.time_proj")
    if wan.image_dim is not None:
        pre = "condition_embedder.image_embedder"
        r += _wb("image_embedder.norm_in", f"{pre}.norm1") + _wb("image_embedder.norm_out", f"{pre}.norm2")
        r += _wb("image_embedder.linear_1", f"{pre}.ff.net.0.proj") + _wb("image_embedder.linear_2", f"{pre}.ff.net.2")
        if wan.pos_embed_seq_len is not None:
            r.append(Rename(ours="image_embedder.pos_embed", hf=f"{pre}.pos_embed"))
    heads, d = wan.num_attention_heads, wan.attention_head_dim
    for part in ("weight", "bias"):  # self-attention: megatron's fused linear_qkv, one group per head
        h = "blocks.{i}.attn1"
        r.append(FusedQKV(ours=f"blocks.{{i}}.self_attn.linear_qkv.{part}", hf_q=f"{h}.to_q.{part}",
                          hf_k=f"{h}.to_k.{part}", hf_v=f"{h}.to_v.{part}", num_heads=heads,
                          num_query_groups=heads, head_dim=d))
    r += _wb("blocks.{i}.cross_attn.linear_q", "blocks.{i}.attn2.to_q", 0, 0)
    kv_pairs = [("linear_kv", "to_k", "to_v")]
    if wan.added_kv_proj_dim is not None:
        kv_pairs.append(("linear_kv_img", "add_k_proj", "add_v_proj"))
    for ours, k, v in kv_pairs:  # cross-attention k/v fused as [k_r; v_r] per TP rank
        for part in ("weight", "bias"):
            r.append(FusedGateUp(ours=f"blocks.{{i}}.cross_attn.{ours}.{part}", hf_gate=f"blocks.{{i}}.attn2.{k}.{part}",
                                 hf_up=f"blocks.{{i}}.attn2.{v}.{part}"))
    for ours, hf in (("self_attn", "attn1"), ("cross_attn", "attn2")):
        o, h = f"blocks.{{i}}.{ours}", f"blocks.{{i}}.{hf}"
        r += _wb(f"{o}.linear_proj", f"{h}.to_out.0", 1, None)
        if wan.qk_norm is not None:
            r += _wb(f"{o}.norm_q", f"{h}.norm_q", 0, bias=False) + _wb(f"{o}.norm_k", f"{h}.norm_k", 0, bias=False)
    if wan.added_kv_proj_dim is not None and wan.qk_norm is not None:
        r += _wb("blocks.{i}.cross_attn.norm_k_img", "blocks.{i}.attn2.norm_added_k", 0, bias=False)
    if wan.cross_attn_norm:
        r += _wb("blocks.{i}.cross_attn_norm", "blocks.{i}.norm2")
    r += _wb("blocks.{i}.mlp.linear_fc1", "blocks.{i}.ffn.net.0.proj", 0, 0)
    r += _wb("blocks.{i}.mlp.linear_fc2", "blocks.{i}.ffn.net.2", 1, None)
    r.append(Rename(ours="blocks.{i}.modulation", hf="blocks.{i}.scale_shift_table"))
    r += _wb("proj_out", "proj_out")
    r.append(Rename(ours="head_modulation", hf="scale_shift_table"))
    return r


def weight_mapping(wan: WanConfig) -> WeightMapping:
    # diffusers' own loader ignores norm_added_q (old checkpoints carry it; it is never used)
    return WeightMapping(rules(wan), wan.num_layers, ignore_hf=(r"blocks\.\d+\.attn2\.norm_added_q\.weight",))


# --- files -----------------------------------------------------------------------------------------
def diffusers_getter(folder: str | os.PathLike):
    """Tensor getter (with ``.slice`` for per-TP-rank reads) over a diffusers transformer folder."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / f"{DIFFUSERS_WEIGHTS}.index.json"
    if index.is_file():
        where = {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    elif (folder / DIFFUSERS_WEIGHTS).is_file():
        where = None
    else:
        raise FileNotFoundError(f"{folder}: neither {DIFFUSERS_WEIGHTS} nor its .index.json")
    handles: dict[Path, object] = {}

    def handle(name):
        file = folder / DIFFUSERS_WEIGHTS if where is None else where.get(name)
        if file is None:
            raise KeyError(f"{folder} has no tensor {name!r}")
        if file not in handles:
            handles[file] = safe_open(str(file), framework="pt")
        return handles[file]

    def get(name):
        try:
            return handle(name).get_tensor(name)
        except Exception as exc:
            raise KeyError(f"{folder} has no tensor {name!r}") from exc

    get.slice = lambda name: handle(name).get_slice(name)
    get.names = lambda: list(where) if where is not None else _keys(folder)
    return get


def _keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / DIFFUSERS_WEIGHTS), framework="pt") as f:
        return list(f.keys())


def read_diffusers_config(folder: str | os.PathLike, **pipeline) -> WanConfig:
    data = json.loads((Path(folder) / "config.json").read_text())
    return WanConfig.from_diffusers(data, **pipeline)


def diffusers_to_ours(src: str | os.PathLike, dst: str | os.PathLike, **pipeline) -> WanConfig:
    """Convert a diffusers transformer folder into ours (``wan_config.json`` + ``model.safetensors``)."""
    from safetensors.torch import save_file

    wan = read_diffusers_config(src, **pipeline)
    mapping, get = weight_mapping(wan), diffusers_getter(src)
    names = get.names()
    left = mapping.unmapped_hf(names)
    if left:
        raise ValueError(f"{src}: tensors no Wan rule reads: {left[:8]}")
    tensors = mapping.hf_to_ours(get)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / OUR_WEIGHTS), metadata={"format": "pt"})
    save_wan_config(wan, dst)
    return wan


def ours_to_diffusers(src: str | os.PathLike, dst: str | os.PathLike) -> WanConfig:
    """Convert our folder back into a diffusers transformer folder (same tensor bytes)."""
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    wan = load_wan_config(src)
    ours = load_file(str(src / OUR_WEIGHTS))
    tensors = weight_mapping(wan).ours_to_hf(ours.__getitem__)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / DIFFUSERS_WEIGHTS), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(wan.to_diffusers(), indent=2))
    return wan


def save_wan_config(wan: WanConfig, folder: str | os.PathLike) -> None:
    import dataclasses

    data = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(wan).items() if k != "extra"}
    (Path(folder) / OUR_CONFIG).write_text(json.dumps(data, indent=2))


def load_wan_config(folder: str | os.PathLike) -> WanConfig:
    return WanConfig(**json.loads((Path(folder) / OUR_CONFIG).read_text()))


def load_diffusers_into(model: torch.nn.Module, folder: str | os.PathLike, tp_rank: int = 0, tp_size: int = 1) -> None:
    """Load a diffusers transformer folder into a built :class:`WanDiT` (this TP rank's shards)."""
    from loongforge.weight_mapping import load_into

    load_into(model, weight_mapping(model.wan).hf_to_ours(diffusers_getter(folder), tp_rank, tp_size))
