"""What the ``vlm_sft`` task hands the model and the data pipeline besides the text (kept here so
the task stays modality-neutral and this package owns the multimodal keys).

* :func:`model_inputs` -- the multimodal keyword arguments of ``VLMModel.forward`` present in a
  collated batch (images, videos and their grids, multimodal RoPE positions), moved to ``device``.
* :func:`layout_tokens` -- the special tokens the layout writes into the text (a tokenizer that
  lacks them gets them added).
* :func:`resolve_token_ids` -- ``provider.image_token_id`` / ``video_token_id`` from the tokenizer
  unless the config sets them.
* :func:`dataset_kwargs` -- the keyword arguments of ``VLMConversationDataset`` that come from the
  model: the image and video processors and the layout's tokens.
"""

from __future__ import annotations

#: batch keys passed to ``VLMModel.forward`` as they are, when present
MODEL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "mrope_position_ids")


def model_inputs(batch: dict, device) -> dict:
    return {k: batch[k].to(device) for k in MODEL_KEYS if k in batch}


def layout_tokens(layout) -> list[str]:
    return [t for t in (layout.vision_start_token, layout.image_token, layout.video_token, layout.vision_end_token) if t]


def resolve_token_ids(provider, tokenizer) -> None:
    layout = provider.layout
    if provider.image_token_id is None:
        provider.image_token_id = tokenizer.convert_tokens_to_ids(layout.image_token)
    if provider.video_token_id is None and layout.video_token:
        provider.video_token_id = tokenizer.convert_tokens_to_ids(layout.video_token)


def dataset_kwargs(provider) -> dict:
    layout = provider.layout
    out = {"processor": provider.image_processor(), "image_token": layout.image_token,
           "vision_start": layout.vision_start_token, "vision_end": layout.vision_end_token}
    video = provider.video_processor()
    if video is not None:
        out.update(video_processor=video, video_token=layout.video_token)
    return out
