"""Multimodal RoPE positions (Qwen2-VL): text advances one position per token on all three axes;
an image's tokens share its start position in time and spread over rows/cols from it, and the
text after it resumes at start + max(rows, cols).

Videos (Qwen3-VL): each frame (temporal patch) of a clip is its own run of video tokens between
timestamp text, positioned as a still image (``video_grid_thw`` rows are split into frames)."""

from __future__ import annotations

import torch


def mrope_positions(input_ids: torch.Tensor, grid_thw, image_token_id: int, merge_size: int, *,
                    video_token_id: int | None = None, video_grid_thw=()) -> torch.Tensor:
    """[3, s] positions of one sequence ``input_ids`` [s] whose images (runs of ``image_token_id``)
    have ``grid_thw`` and whose videos (runs of ``video_token_id``) have ``video_grid_thw`` (in order)."""
    ids = input_ids.tolist()
    out = torch.zeros(3, len(ids), dtype=torch.long)
    grids = {image_token_id: iter([tuple(int(v) for v in g) for g in grid_thw])}
    if video_token_id is not None:
        frames = [(1, int(h), int(w)) for t, h, w in video_grid_thw for _ in range(int(t))]
        grids[video_token_id] = iter(frames)
    i, pos = 0, 0
    while i < len(ids):
        if ids[i] not in grids:
            out[:, i] = pos
            i, pos = i + 1, pos + 1
            continue
        try:
            t, h, w = next(grids[ids[i]])
        except StopIteration:
            raise ValueError(f"more runs of vision token {ids[i]} in the text than grids given") from None
        gh, gw = h // merge_size, w // merge_size
        n = t * gh * gw
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        out[:, i:i + n] = torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + pos
        i, pos = i + n, pos + max(gh, gw)
    return out
