"""``VLMProvider``: reads the composed ``model`` section and builds encoder + projector + LLM.

The section (see ``configs/qwen2_5_vl_tiny.yaml``)::

    family: vlm
    model_type: qwen2_5_vl        # HF checkpoint layout (model_types.LAYOUTS)
    foundation: {family: qwen2, hidden_size: ...}   # any registered LLM family's section
    image_encoder: {name: qwen2_5_vit, ...}          # a registered image_encoder component
    image_projector: {name: qwen2_5_merger, ...}     # a registered image_projector component
    mrope_section: [16, 24, 24]   # multimodal RoPE of the LLM; null: plain 1D positions
    mrope_interleaved: false      # Qwen3-VL: t/h/w interleaved over the rotary dims (model.mrope_axes)
    image_token_id: null          # null: taken from the tokenizer by the task
    video_token_id: null          # the same for video frames (layouts with video)

The LLM part is entirely the foundation family's provider (its TransformerConfig, padded vocab,
layer spec and weight rules); this class only decides what exists on a pipeline stage (the
vision parts on the first one) and wires sizes between the parts (the projector's input is the
encoder's width, its output the LLM's hidden size).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from loongforge.config import ConfigError
from loongforge.model_provider import RunSettings
from loongforge.registry import load_object

from loongforge_vlm.hf_config import model_cfg_from_hf_config  # noqa: F401 -- read by loongforge-ckpt
from loongforge_vlm.model_types import LAYOUTS


def _plain(section: Any) -> dict:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(section, DictConfig):
        return OmegaConf.to_container(section, resolve=True)
    return dict(section)


@dataclass(frozen=True)
class EncoderParallel:
    """``model.image_encoder.parallel``: how the vision parts run, independently of the LLM's layout.

    ``tp``: the encoder's tensor-parallel size, 1 or the LLM's ``parallel.tp``. With the LLM's size,
    the encoder's attention heads and MLP columns are split over the LLM's TP group
    (``components.tensor_parallel``; the group is handed to the encoder when it is built, no global
    parallel state is switched); the projector stays whole. With 1 the encoder and projector are
    whole on every rank of the first pipeline stage and, under LLM TP=N, ``split_images`` (default)
    makes the N TP ranks -- which share their micro-batch -- each encode a share of its images and
    all-gather the tokens (encoder data parallelism over the TP ranks, ``components.image_split``);
    ``split_images: false`` has every TP rank encode every image. Sizes in between would need their
    own process groups plus gradient-norm and checkpoint bookkeeping megatron-core has no hook for.
    Across the LLM's data-parallel ranks megatron-core's DDP reduces the encoder's gradients.
    ``recompute``: recompute the encoder's activations in the backward pass instead of keeping them.
    """

    tp: int = 1
    recompute: bool = False
    split_images: bool = True


def encoder_parallel(section: Any) -> EncoderParallel:
    s = _plain(section) if section is not None else {}
    unknown = sorted(set(s) - {f.name for f in fields(EncoderParallel)})
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join('model.image_encoder.parallel.' + k for k in unknown)} "
                          f"(valid: tp, recompute, split_images)")
    out = EncoderParallel(**s)
    if not isinstance(out.tp, int) or out.tp < 1:
        raise ConfigError(f"config key 'model.image_encoder.parallel.tp' must be a positive integer, got {out.tp!r}")
    return out


class VLMProvider:
    def __init__(self, model_cfg: Any, *, plugins: Any = None):
        if plugins is None:
            from loongforge.plugins import get_plugin_manager

            plugins = get_plugin_manager()
        self.plugins = plugins
        s = _plain(model_cfg)
        self.section = s
        for key in ("foundation", "image_encoder", "image_projector"):
            if not isinstance(s.get(key), dict):
                raise ConfigError(f"config key 'model.{key}' is missing: a VLM config selects it in its defaults list, "
                                  f"e.g. '- /models/{key if key != 'foundation' else 'qwen2_5'}@model.{key}: ...'")
        model_type = s.get("model_type", "qwen2_5_vl")
        if model_type not in LAYOUTS:
            raise ConfigError(f"config key 'model.model_type': unknown VLM layout {model_type!r} (known: {', '.join(LAYOUTS)})")
        self.layout = LAYOUTS[model_type]
        registry = plugins.registry()
        from loongforge.plugins import lookup

        family = s["foundation"].get("family")
        record = lookup(registry.models, family, "LLM family (config key 'model.foundation.family')", plugins.failures)
        self.llm = load_object(record.builder)(s["foundation"])
        self.encoder_cfg = dict(s["image_encoder"])
        self.projector_cfg = dict(s["image_projector"])
        self.encoder_record = self._component(registry, self.encoder_cfg, "image_encoder")
        self.projector_record = self._component(registry, self.projector_cfg, "image_projector")
        # sizes the projector takes from its neighbours unless set
        if self.projector_cfg.get("hidden_size") is None:
            self.projector_cfg["hidden_size"] = s["foundation"]["hidden_size"]
        self.projector_cfg.setdefault("context_dim", self.encoder_cfg.get("hidden_size"))
        if "spatial_merge_size" in self.encoder_cfg:
            self.projector_cfg.setdefault("spatial_merge_size", self.encoder_cfg["spatial_merge_size"])
        if self.projector_cfg.get("image_grid_pinpoints"):  # anyres tiles are the encoder's images
            for key in ("image_size", "patch_size"):
                if not self.projector_cfg.get(key):
                    self.projector_cfg[key] = self.encoder_cfg.get(key)
        if self.projector_cfg.get("num_deepstack") is None and "deepstack_visual_indexes" in self.encoder_cfg:
            # one DeepStack merger per tapped encoder block
            self.projector_cfg["num_deepstack"] = len(self.encoder_cfg.get("deepstack_visual_indexes") or ())
        self.num_deepstack = int(self.projector_cfg.get("num_deepstack") or 0)
        if self.projector_cfg["hidden_size"] != s["foundation"]["hidden_size"]:
            raise ConfigError(f"config key 'model.image_projector.hidden_size' ({self.projector_cfg['hidden_size']}) must "
                              f"equal the LLM's 'model.foundation.hidden_size' ({s['foundation']['hidden_size']})")
        self.encoder_parallel = encoder_parallel(self.encoder_cfg.get("parallel"))
        self.mrope_section = self._mrope_section(s.get("mrope_section"))
        self.mrope_interleaved = bool(s.get("mrope_interleaved", False))
        self.image_token_id = s.get("image_token_id")
        self.video_token_id = s.get("video_token_id")

    def _mrope_section(self, value) -> tuple[int, ...]:
        """``auto``: Qwen2-VL's split (1/4 time, 3/8 rows, 3/8 cols of the rotary dims) scaled to
        the LLM's head_dim, so any LLM can be swapped in; ``null``: plain 1D positions."""
        if not value:
            return ()
        if value == "auto":
            half = self.llm.args.head_dim // 2
            t, h = half // 4, 3 * half // 8
            return (t, h, half - t - h)
        return tuple(int(v) for v in value)

    @staticmethod
    def _component(registry, section: dict, kind: str):
        name = section.get("name")
        rec = registry.components.get(name)
        if rec is None or rec.kind != kind:
            known = sorted(n for n, r in registry.components.items() if r.kind == kind)
            raise ConfigError(f"config key 'model.{kind}.name': no registered {kind} {name!r} (registered: {', '.join(known)})")
        return rec

    def __repr__(self) -> str:
        return f"VLMProvider({self.encoder_cfg.get('name')} x {self.projector_cfg.get('name')} x {self.llm!r})"

    # --- what the trainer asks -------------------------------------------------------------------
    def transformer_config(self, run: RunSettings):
        return self.llm.transformer_config(run)

    def padded_vocab_size(self, run: RunSettings | None = None) -> int:
        return self.llm.padded_vocab_size(run)

    def build_vision(self):
        """(encoder, projector) as plain modules, frozen where the config says so."""
        encoder = load_object(self.encoder_record.builder)(self.encoder_cfg)
        projector = load_object(self.projector_record.builder)(self.projector_cfg)
        for module, section in ((encoder, self.encoder_cfg), (projector, self.projector_cfg)):
            if section.get("freeze"):
                module.requires_grad_(False)
        return encoder, projector

    def image_processor(self):
        """The preprocessing of the encoder: its component module's ``image_processor(encoder_section,
        projector_section)`` (the projector may change the tokens per image, e.g. pixel shuffle)."""
        module = self.encoder_record.builder.split(":")[0]
        try:
            make = load_object(f"{module}:image_processor")
        except (AttributeError, ImportError) as exc:
            raise ConfigError(f"image encoder {self.encoder_cfg.get('name')!r} ({module}) defines no "
                              f"image_processor(encoder_section, projector_section): {exc}") from None
        return make(self.encoder_cfg, self.projector_cfg)

    def video_processor(self):
        """The encoder's video preprocessing (its component module's ``video_processor(encoder_section,
        projector_section)``), or None for an encoder without video input or a layout without a video token."""
        module = self.encoder_record.builder.split(":")[0]
        try:
            make = load_object(f"{module}:video_processor")
        except (AttributeError, ImportError):
            return None
        return make(self.encoder_cfg, self.projector_cfg) if self.layout.video_token else None

    def build(self, config, run: RunSettings, *, backend, pre_process: bool = True, post_process: bool = True,
              vp_stage: int | None = None):
        from loongforge_vlm.model import MRopeGPTModel, VLMModel

        model_class = MRopeGPTModel
        if self.num_deepstack:
            from loongforge_vlm.deepstack import DeepStackGPTModel

            model_class = DeepStackGPTModel
        llm = self.llm.build(config, run, backend=backend, pre_process=pre_process, post_process=post_process,
                             vp_stage=vp_stage, model_class=model_class)
        llm.mrope_section = self.mrope_section
        llm.mrope_interleaved = self.mrope_interleaved
        if pre_process and len(llm.decoder.layers) < self.num_deepstack:
            raise ConfigError(f"DeepStack adds vision features to the outputs of the first {self.num_deepstack} LLM "
                              f"layers (model.image_encoder.deepstack_visual_indexes), but the first pipeline stage "
                              f"holds {len(llm.decoder.layers)}: give it more layers (parallel.pp / layer split)")
        if self.section["foundation"].get("freeze"):
            llm.requires_grad_(False)
        encoder = projector = split_group = None
        if pre_process:
            encoder, projector = self.build_vision()
            split_group = self._encoder_layout(encoder, projector, run)
        return VLMModel(llm, encoder, projector, image_token_id=self.image_token_id, video_token_id=self.video_token_id,
                        mrope=bool(self.mrope_section), recompute_encoder=self.encoder_parallel.recompute,
                        image_split_group=split_group)

    def _encoder_layout(self, encoder, projector, run: RunSettings):
        """Shard the encoder over the LLM's TP group (encoder TP = LLM TP), or return the group whose
        ranks split the images (encoder TP 1 under LLM TP > 1 with ``split_images``), or None."""
        tp = self.encoder_parallel.tp
        key = "model.image_encoder.parallel.tp"
        if tp not in (1, run.tp):
            raise ConfigError(f"config key '{key}' is {tp}: it must be 1 (whole encoder, images split over the "
                              f"LLM's TP ranks) or the LLM's parallel.tp ({run.tp})")
        if run.tp == 1:
            return None
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
        if tp == 1:
            if not self.encoder_parallel.split_images:
                return None
            from loongforge_vlm.components.image_split import mark_tp_averaged

            mark_tp_averaged(encoder)
            mark_tp_averaged(projector)
            return group
        from loongforge_vlm.components.tensor_parallel import shard

        try:
            shard(encoder, group, key=key)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return None

    # --- weights ---------------------------------------------------------------------------------
    def load_hf_weights(self, chunk, get_hf_tensor, *, tp_rank: int | None = None, tp_size: int | None = None,
                        run: RunSettings | None = None) -> None:
        """Load an HF checkpoint of ``model_type``'s layout: the LLM through its family's rules (names
        re-prefixed by the layout), the vision parts by the layout's renames."""
        from loongforge.weight_mapping import load_into

        while hasattr(chunk, "module"):
            chunk = chunk.module
        layout = self.layout
        self.llm.load_hf_weights(chunk.language_model, lambda name: get_hf_tensor(layout.llm_hf_name(name)),
                                 tp_rank=tp_rank, tp_size=tp_size, run=run)
        for part in ("image_encoder", "image_projector"):
            module = getattr(chunk, part)
            if module is None:
                continue
            tensors = {n: _tp_slice(module, p, _first_present(get_hf_tensor, layout.vision_hf_candidates(f"{part}.{n}")))
                       for n, p in module.named_parameters()}
            load_into(module, tensors)

    def export_hf_weights(self, chunk, run: RunSettings | None = None) -> dict[str, Any]:
        """HF tensors (``model_type``'s layout) of a whole model built with tp=1, pp=1."""
        while hasattr(chunk, "module"):
            chunk = chunk.module
        out = {self.layout.llm_hf_name(k): v for k, v in self.llm.export_hf_weights(chunk.language_model, run).items()}
        for ours, hf in self.hf_names(chunk).items():
            out[hf] = chunk.get_parameter(ours).detach()
        return out

    def weight_mapping(self, run: RunSettings | None = None):
        """The whole model's declarative HF <-> ours rules (``loongforge.weight_mapping``), as the
        checkpoint converters read them: the LLM family's rules under ``language_model.`` with
        their HF names re-prefixed by the layout, and one rename per vision parameter, held by the
        first pipeline stage."""
        import dataclasses

        import torch
        from loongforge.weight_mapping import Rename, WeightMapping

        llm = self.llm.weight_mapping(run)
        rules = []
        for r in llm.rules:
            names = {f.name for f in dataclasses.fields(r)}
            change = {"ours": "language_model." + r.ours}
            change.update({n: self.layout.llm_hf_name(getattr(r, n)) for n in names
                           if n.startswith("hf") and isinstance(getattr(r, n), str) and getattr(r, n)})
            if "stage" in names:
                change["stage"] = r.where  # the prefix hides what the name says about the stage
            rules.append(dataclasses.replace(r, **change))
        with torch.device("meta"):
            encoder, projector = self.build_vision()
        for part, module in (("image_encoder", encoder), ("image_projector", projector)):
            for n, _ in module.named_parameters():
                ours = f"{part}.{n}"
                rules.append(Rename(ours=ours, hf=self.layout.vision_hf_name(ours), stage="embedding"))
        if llm.ignore_hf:
            raise NotImplementedError("re-prefixing an LLM family's ignore_hf patterns for a VLM layout")
        return WeightMapping(rules, llm.num_layers, ignore_hf=self.layout.ignore_hf)

    def hf_names(self, chunk) -> dict[str, str]:
        """Our vision parameter names -> HF names (for export and inspection)."""
        out = {}
        for part in ("image_encoder", "image_projector"):
            module = getattr(chunk, part)
            if module is not None:
                out.update({f"{part}.{n}": self.layout.vision_hf_name(f"{part}.{n}") for n, _ in module.named_parameters()})
        return out

    def hf_config(self) -> dict[str, Any]:
        """The HF ``config.json`` dict of this model in ``model_type``'s layout."""
        text = dict(self.llm.hf_config())
        text.pop("architectures", None)
        e, p = self.encoder_cfg, self.projector_cfg
        if self.layout.model_type == "llava_onevision":
            vision = {"model_type": "siglip_vision_model", "num_hidden_layers": e["depth"],
                      "num_attention_heads": e["num_heads"], "num_channels": e.get("in_channels", 3),
                      "vision_use_head": False,
                      **{k: e[k] for k in ("hidden_size", "intermediate_size", "image_size", "patch_size",
                                           "layer_norm_eps", "hidden_act") if k in e}}
            cfg = {"architectures": [self.layout.hf_architecture], "model_type": "llava_onevision",
                   "text_config": text, "vision_config": vision, "vision_feature_layer": -1,
                   "vision_feature_select_strategy": "full", "projector_hidden_act": p.get("hidden_act", "gelu"),
                   "multimodal_projector_bias": p.get("bias", True),
                   "tie_word_embeddings": text.get("tie_word_embeddings", False)}
            if p.get("image_grid_pinpoints"):
                cfg["image_grid_pinpoints"] = [list(x) for x in p["image_grid_pinpoints"]]
                cfg["vision_aspect_ratio"] = f"anyres_max_{p.get('max_tiles') or 9}"
            if self.image_token_id is not None:
                cfg["image_token_index"] = self.image_token_id
            return cfg
        if self.layout.model_type == "internvl":
            vision = {"model_type": "internvl_vision", "num_hidden_layers": e["depth"], "num_attention_heads": e["num_heads"],
                      "num_channels": e.get("in_channels", 3), "norm_type": "layer_norm", "use_qk_norm": False,
                      "use_mean_pooling": True,
                      **{k: e[k] for k in ("hidden_size", "intermediate_size", "image_size", "patch_size", "layer_norm_eps",
                                           "hidden_act", "attention_bias", "layer_scale_init_value") if k in e}}
            cfg = {"architectures": [self.layout.hf_architecture], "model_type": "internvl",
                   "text_config": text, "vision_config": vision, "vision_feature_layer": -1,
                   "vision_feature_select_strategy": "default", "downsample_ratio": p.get("downsample_ratio", 0.5),
                   "projector_hidden_act": p.get("hidden_act", "gelu"),
                   "tie_word_embeddings": text.get("tie_word_embeddings", False)}
            if self.image_token_id is not None:
                cfg["image_token_id"] = self.image_token_id
            return cfg
        if self.layout.model_type == "qwen3_vl":
            return self._qwen3_vl_config(text)
        if self.layout.model_type != "qwen2_5_vl":
            raise NotImplementedError(f"no HF config export for {self.layout.model_type!r}")
        text["model_type"] = "qwen2_5_vl_text"
        if self.mrope_section:
            text["rope_scaling"] = {"rope_type": "default", "mrope_section": list(self.mrope_section)}
        vision = {k: e[k] for k in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                                    "temporal_patch_size", "spatial_merge_size", "window_size", "hidden_act") if k in e}
        vision["fullatt_block_indexes"] = list(e.get("fullatt_block_indexes", []))
        vision["out_hidden_size"] = p["hidden_size"]
        cfg = {"architectures": [self.layout.hf_architecture], "model_type": "qwen2_5_vl",
               "text_config": text, "vision_config": vision,
               "tie_word_embeddings": text.get("tie_word_embeddings", False)}
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if self.section.get(key) is not None:
                cfg[key] = self.section[key]
        return cfg


    def _qwen3_vl_config(self, text: dict[str, Any]) -> dict[str, Any]:
        e = self.encoder_cfg
        text["model_type"] = "qwen3_vl_text"
        rope = {"rope_type": "default", "rope_theta": text.pop("rope_theta")}
        if text.pop("rope_scaling", None):
            raise NotImplementedError("RoPE scaling in a Qwen3-VL text config")
        if self.mrope_section:
            rope.update(mrope_section=list(self.mrope_section), mrope_interleaved=self.mrope_interleaved)
        text["rope_parameters"] = rope
        for key in ("use_sliding_window", "sliding_window", "max_window_layers"):
            text.pop(key, None)
        vision = {k: (list(e[k]) if k == "deepstack_visual_indexes" else e[k])
                  for k in ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                            "temporal_patch_size", "spatial_merge_size", "num_position_embeddings",
                            "deepstack_visual_indexes", "hidden_act") if k in e}
        vision["out_hidden_size"] = self.projector_cfg["hidden_size"]
        cfg = {"architectures": [self.layout.hf_architecture], "model_type": "qwen3_vl",
               "text_config": text, "vision_config": vision,
               "tie_word_embeddings": text.get("tie_word_embeddings", False)}
        for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if self.section.get(key) is not None:
                cfg[key] = self.section[key]
        return cfg


def _tp_slice(module, param, full):
    """This rank's part of a full HF tensor for a parameter split by ``components.tensor_parallel``."""
    if not getattr(param, "tensor_model_parallel", False) or getattr(module, "tp_group", None) is None:
        return full
    import torch.distributed as dist

    group = module.tp_group
    return full.chunk(dist.get_world_size(group), param.partition_dim)[dist.get_rank(group)]


def _first_present(get_hf_tensor, names: list[str]):
    """The tensor of the first of ``names`` the checkpoint has; getters raise different errors for
    a missing name, so the first name's error is the one reported when none is there."""
    try:
        return get_hf_tensor(names[0])
    except Exception as first:  # noqa: BLE001
        for alt in names[1:]:
            try:
                return get_hf_tensor(alt)
            except Exception:  # noqa: BLE001
                continue
        raise first
