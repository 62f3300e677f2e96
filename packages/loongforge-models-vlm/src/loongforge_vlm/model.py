"""The combination model: which parts exist on this rank and how data flows between them.

``VLMModel`` holds the LLM chunk (a megatron-core ``GPTModel``) and, on the first pipeline stage,
the image encoder and projector. It computes nothing of its own: the projected image (and video)
features replace the text embeddings at the image (video) token positions (in order: batch row by
row, then sequence), DeepStack features (Qwen3-VL) go to the LLM as a dense ``context`` tensor
(:mod:`loongforge_vlm.deepstack`), and the LLM runs on the result. ``MRopeGPTModel`` is the LLM
with multimodal RoPE (temporal/height/width position ids; contiguous or interleaved sections).
"""

from __future__ import annotations

import torch
from loongforge_llm.common.model import PositionIdsGPTModel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import MegatronModule


def mrope_axes(section: tuple[int, ...], interleaved: bool) -> torch.Tensor:
    """The position axis (0 time, 1 rows, 2 cols) of each rotary dim ``j < sum(section)``.

    Contiguous (Qwen2-VL): the first ``section[0]`` dims time, the next rows, the rest cols.
    Interleaved (Qwen3-VL): dims ``j = 1 mod 3`` below ``3 * section[1]`` rows, ``j = 2 mod 3`` below
    ``3 * section[2]`` cols, all others time.
    """
    if not interleaved:
        return torch.repeat_interleave(torch.arange(len(section)), torch.tensor(section))
    j = torch.arange(sum(section))
    axis = torch.zeros_like(j)
    for a in (1, 2):
        axis[(j % 3 == a) & (j < 3 * section[a])] = a
    return axis


class MRopeGPTModel(PositionIdsGPTModel):
    """Rotary angles from 3D ``position_ids`` [3, b, s]: rotary dim ``j`` (of ``head_dim / 2``) takes
    its position from the axis ``mrope_axes`` assigns it. 2D ids behave as in the parent."""

    mrope_section: tuple[int, ...] = ()
    mrope_interleaved: bool = False

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        if position_ids is None or position_ids.dim() != 3:
            return super()._preprocess(input_ids, position_ids, *args, **kwargs)
        out = GPTModel._preprocess(self, input_ids, position_ids[0], *args, **kwargs)
        inv_freq = self.rotary_pos_emb.inv_freq.to(position_ids.device)
        if sum(self.mrope_section) != inv_freq.numel():
            raise ValueError(f"config key 'model.mrope_section' {list(self.mrope_section)} must sum to "
                             f"head_dim / 2 = {inv_freq.numel()}")
        axis = mrope_axes(self.mrope_section, self.mrope_interleaved)
        freqs = position_ids.transpose(1, 2).to(inv_freq.dtype)[..., None] * inv_freq  # [3, s, b, d/2]
        freqs = freqs.gather(0, axis.to(freqs.device).expand(1, *freqs.shape[1:3], -1))[0]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return (out[0], emb, *out[2:])


def scatter_image_features(embeddings: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor,
                           image_token_id: int) -> torch.Tensor:
    """``embeddings`` [s, b, h] with the rows at ``input_ids == image_token_id`` replaced by
    ``features`` [n, h] (batch row by row, then sequence order)."""
    mask = input_ids == image_token_id  # [b, s]
    n = int(mask.sum())
    if n != features.shape[0]:
        raise ValueError(f"the batch has {n} vision tokens (id {image_token_id}) but the encoder produced "
                         f"{features.shape[0]} features; the text and the images/videos do not match")
    e = embeddings.transpose(0, 1)
    e = e.masked_scatter(mask[..., None].to(e.device), features.to(e.dtype))
    return e.transpose(0, 1).contiguous()


def dense_deepstack(shape_bs: tuple[int, int], parts: list[tuple[torch.Tensor, list[torch.Tensor]]]) -> torch.Tensor | None:
    """[k, s, b, h] from ``parts``: (mask [b, s], k feature tensors [n_mask, h]) per modality
    (images, videos); the features of each modality go to its mask's positions in row-major order."""
    parts = [(mask, feats) for mask, feats in parts if feats]
    if not parts:
        return None
    k = len(parts[0][1])
    first = parts[0][1][0]
    b, s = shape_bs
    out = first.new_zeros(k, b, s, first.shape[-1])
    for mask, feats in parts:
        if len(feats) != k:
            raise ValueError(f"images and videos give different numbers of DeepStack features ({k} vs {len(feats)})")
        m = mask.to(out.device)[None, ..., None].expand_as(out)
        out = out.masked_scatter(m, torch.stack(feats).to(out.dtype))
    return out.transpose(1, 2)


class VLMModel(MegatronModule):
    """One pipeline chunk of a VLM. ``forward`` has the LLM's signature plus the image inputs."""

    def __init__(self, language_model: GPTModel, image_encoder=None, image_projector=None, *,
                 image_token_id: int | None = None, video_token_id: int | None = None, mrope: bool = False,
                 recompute_encoder: bool = False, image_split_group=None):
        super().__init__(config=language_model.config)
        self.language_model = language_model
        self.image_encoder = image_encoder
        self.image_projector = image_projector
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.mrope = mrope
        self.recompute_encoder = recompute_encoder
        #: the group whose ranks split the images (encoder data parallelism over the LLM's TP ranks)
        self.image_split_group = image_split_group
        self.deepstack = bool(getattr(image_projector, "num_deepstack", 0))
        self.model_type = language_model.model_type  # read by megatron-core's schedules
        self.pre_process = language_model.pre_process
        self.post_process = language_model.post_process
        self.share_embeddings_and_output_weights = language_model.share_embeddings_and_output_weights

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        """The projector's output for these images (or video clips): LLM tokens [n, h], or
        ``(tokens, deepstack features)`` for a projector with DeepStack mergers. With
        ``image_split_group`` each rank of that group encodes its share of the images and the
        tokens are all-gathered (``components.image_split``)."""
        group = self.image_split_group
        if group is None or torch.distributed.get_world_size(group) == 1:
            return self._encode(pixel_values, image_grid_thw)
        from loongforge_vlm.components.image_split import GatherShards, pixel_rows, shares

        rows = pixel_rows(pixel_values, image_grid_thw)
        a, b = shares(rows, torch.distributed.get_world_size(group))[torch.distributed.get_rank(group)]
        if b > a:
            out = self._encode(pixel_values[sum(rows[:a]):sum(rows[:b])], image_grid_thw[a:b])
        else:  # more ranks than images: this one contributes no rows
            empty = pixel_values.new_zeros(0, self.config.hidden_size)
            out = (empty, [empty] * self.image_projector.num_deepstack) if self.deepstack else empty
        if isinstance(out, tuple):
            return GatherShards.apply(out[0], group), [GatherShards.apply(d, group) for d in out[1]]
        return GatherShards.apply(out, group)

    def _encode(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        if self.recompute_encoder and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            features, aux = checkpoint(self.image_encoder, pixel_values, image_grid_thw, use_reentrant=False)
        else:
            features, aux = self.image_encoder(pixel_values, image_grid_thw)
        return self.image_projector(features, aux)

    def forward(self, input_ids, position_ids, attention_mask, labels=None, *, pixel_values=None,
                image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None, mrope_position_ids=None):
        decoder_input, extra = None, None
        if self.pre_process:
            decoder_input = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)
            deepstack = []
            for pixels, grid, token_id, key in (
                    (pixel_values, image_grid_thw, self.image_token_id, "image_token_id"),
                    (pixel_values_videos, video_grid_thw, self.video_token_id, "video_token_id")):
                if pixels is None or not pixels.numel():
                    continue
                if token_id is None:
                    raise ValueError(f"config key 'model.{key}' is not set (the task fills it from the tokenizer)")
                out = self.image_features(pixels, grid)
                features, deep = out if isinstance(out, tuple) else (out, [])
                decoder_input = scatter_image_features(decoder_input, input_ids, features, token_id)
                deepstack.append((input_ids == token_id, deep))
            context = dense_deepstack(tuple(input_ids.shape), deepstack)
            if context is not None:
                extra = {"context": context}
        if self.mrope:
            if mrope_position_ids is None:
                raise ValueError("this model uses multimodal RoPE (model.mrope_section): mrope_position_ids is required")
            position_ids = mrope_position_ids.transpose(0, 1)  # [b, 3, s] -> [3, b, s]
        return self.language_model(input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels,
                                   extra_block_kwargs=extra)
