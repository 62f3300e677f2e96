"""Multimodal RoPE positions (Qwen2-VL): text advances one position per token on all three axes;
an image's tokens share its start position in time and spread over rows/cols from it, and the
text after it resumes at start + max(rows, cols)."""

from __future__ import annotations

import torch


def mrope_positions(input_ids: torch.Tensor, grid_thw, image_token_id: int, merge_size: int) -> torch.Tensor:
    """[3, s] positions of one sequence ``input_ids`` [s] whose images (runs of ``image_token_id``)
    have ``grid_thw`` (in order)."""
    ids = input_ids.tolist()
    out = torch.zeros(3, len(ids), dtype=torch.long)
    grids = iter([tuple(int(v) for v in g) for g in grid_thw])
    i, pos = 0, 0
    while i < len(ids):
        if ids[i] != image_token_id:
            out[:, i] = pos
            i, pos = i + 1, pos + 1
            continue
        t, h, w = next(grids)
        gh, gw = h // merge_size, w // merge_size
        n = t * gh * gw
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
        out[:, i:i + n] = torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + pos
        i, pos = i + n, pos + max(gh, gw)
    return out
