"""The combination model: which parts exist on this rank and how data flows between them.

``VLMModel`` holds the LLM chunk (a megatron-core ``GPTModel``) and, on the first pipeline stage,
the image encoder and projector. It computes nothing of its own: the projected image features
replace the text embeddings at the image-token positions (in order: batch row by row, then
sequence), and the LLM runs on the result. ``MRopeGPTModel`` is the LLM with Qwen2-VL's
multimodal RoPE (temporal/height/width position ids, one per section of the rotary dims).
"""

from __future__ import annotations

import torch
from loongforge_llm.common.model import PositionIdsGPTModel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.module import MegatronModule


class MRopeGPTModel(PositionIdsGPTModel):
    """Rotary angles from 3D ``position_ids`` [3, b, s]: rotary dim ``j`` (of ``head_dim / 2``) takes
    its position from the axis whose ``mrope_section`` it falls in. 2D ids behave as in the parent."""

    mrope_section: tuple[int, ...] = ()

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        if position_ids is None or position_ids.dim() != 3:
            return super()._preprocess(input_ids, position_ids, *args, **kwargs)
        out = GPTModel._preprocess(self, input_ids, position_ids[0], *args, **kwargs)
        inv_freq = self.rotary_pos_emb.inv_freq.to(position_ids.device)
        if sum(self.mrope_section) != inv_freq.numel():
            raise ValueError(f"config key 'model.mrope_section' {list(self.mrope_section)} must sum to "
                             f"head_dim / 2 = {inv_freq.numel()}")
        axis = torch.repeat_interleave(torch.arange(len(self.mrope_section)), torch.tensor(self.mrope_section))
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
        raise ValueError(f"the batch has {n} image tokens (id {image_token_id}) but the encoder produced "
                         f"{features.shape[0]} image features; the text and the images do not match")
    e = embeddings.transpose(0, 1)
    e = e.masked_scatter(mask[..., None].to(e.device), features.to(e.dtype))
    return e.transpose(0, 1).contiguous()


class VLMModel(MegatronModule):
    """One pipeline chunk of a VLM. ``forward`` has the LLM's signature plus the image inputs."""

    def __init__(self, language_model: GPTModel, image_encoder=None, image_projector=None, *,
                 image_token_id: int | None = None, mrope: bool = False, recompute_encoder: bool = False):
        super().__init__(config=language_model.config)
        self.language_model = language_model
        self.image_encoder = image_encoder
        self.image_projector = image_projector
        self.image_token_id = image_token_id
        self.mrope = mrope
        self.recompute_encoder = recompute_encoder
        self.model_type = language_model.model_type  # read by megatron-core's schedules
        self.pre_process = language_model.pre_process
        self.post_process = language_model.post_process
        self.share_embeddings_and_output_weights = language_model.share_embeddings_and_output_weights

    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        if self.recompute_encoder and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            features, restore = checkpoint(self.image_encoder, pixel_values, image_grid_thw, use_reentrant=False)
        else:
            features, restore = self.image_encoder(pixel_values, image_grid_thw)
        return self.image_projector(features, restore)

    def forward(self, input_ids, position_ids, attention_mask, labels=None, *, pixel_values=None,
                image_grid_thw=None, mrope_position_ids=None):
        decoder_input = None
        if self.pre_process:
            decoder_input = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)
            if pixel_values is not None and pixel_values.numel():
                if self.image_token_id is None:
                    raise ValueError("config key 'model.image_token_id' is not set (the task fills it from the tokenizer)")
                features = self.image_features(pixel_values, image_grid_thw)
                decoder_input = scatter_image_features(decoder_input, input_ids, features, self.image_token_id)
        if self.mrope:
            if mrope_position_ids is None:
                raise ValueError("this model uses multimodal RoPE (model.mrope_section): mrope_position_ids is required")
            position_ids = mrope_position_ids.transpose(0, 1)  # [b, 3, s] -> [3, b, s]
        return self.language_model(input_ids, position_ids, attention_mask, decoder_input=decoder_input, labels=labels)
