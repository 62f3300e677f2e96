"""From clean latents to the DiT's token inputs and loss weights: stacking, packing, CP split.

Per sample (:func:`sample_tokens`): the flow-matching draw (noise, sigma, CFG dropout, clean
first frame) from the sample's own generator, its patch tokens, 3D positions restarting at
(0, 0, 0), per-token timesteps and per-token loss coefficients
``coef = weight / (number of loss tokens of the sample)``, so ``sum(coef * err_token)`` over the
sample's tokens is its weighted mean error whether or not its tokens sit in one row.

:func:`assemble` then either **stacks** samples of one shape (``[B, S, ...]``, no masks) or
**packs** a micro-batch into one row ``[1, sum S_i, ...]`` with a block-diagonal self-attention
mask (a token sees only its own clip) and a cross-attention mask (a token sees only its own
clip's text; the texts are concatenated ``[1, B * L, D]``). The loss is ``sum(coef * err)`` either
way, so a packed micro-batch has the same loss as the same clips stacked (``test_packing``).

:func:`split_for_cp` gives CP rank ``r`` its contiguous part of the tokens (and of the rows of the
cross mask); the self mask stays whole (Ulysses attends over the full sequence).
"""

from __future__ import annotations

import torch

from loongforge_diffusion.flow import FlowMatching
from loongforge_diffusion.wan.rope import grid_positions


def sample_tokens(dit, flow: FlowMatching, latent: torch.Tensor, text: torch.Tensor, null_text: torch.Tensor,
                  seed: int) -> dict:
    """One sample's tokens [S, C*patch], positions [S, 3], timestep [S], target [S, patch*C], coef [S], text [L, D]."""
    gen = torch.Generator().manual_seed(int(seed))
    per_token = dit.wan.expand_timesteps
    prep = flow.prepare(latent[None].float(), text[None].float(), null_text[None].float(), gen, per_token=per_token)
    grid = dit.grid(latent.shape)
    pt = dit.wan.patch_size[0]
    tokmask = FlowMatching.token_timesteps(prep["frame_mask"][:, ::pt], grid)[0]
    if per_token:
        timestep = FlowMatching.token_timesteps(prep["frame_t"][:, ::pt], grid)[0]
    else:
        timestep = prep["timestep"].expand(tokmask.shape[0])
    return {"tokens": dit.patchify(prep["x_t"])[0], "positions": grid_positions(*grid),
            "timestep": timestep, "target": dit.patchify(prep["target"], channels_last=True)[0],
            "coef": tokmask * prep["weight"][0] / tokmask.sum().clamp(min=1), "text": prep["text"][0]}


def assemble(items: list[dict], pack: bool, per_token: bool) -> dict:
    """Model inputs (``tokens``, ``positions``, ``timestep``, ``context``, masks) + ``target``, ``coef``."""
    if not pack:
        lengths = {it["tokens"].shape[0] for it in items}
        if len(lengths) > 1:
            raise ValueError(f"clips of different token counts {sorted(lengths)} in one micro-batch: set "
                             "diffusion.packing=true (or use one bucket)")
        out = {k: torch.stack([it[k] for it in items]) for k in ("tokens", "positions", "timestep", "target", "coef")}
        out["context"] = torch.stack([it["text"] for it in items])
        if not per_token:
            out["timestep"] = out["timestep"][:, 0]  # one per sample
        out["self_mask"] = out["cross_mask"] = None
        return out
    out = {k: torch.cat([it[k] for it in items])[None] for k in ("tokens", "positions", "timestep", "target", "coef")}
    out["context"] = torch.cat([it["text"] for it in items])[None]
    seg = torch.cat([torch.full((it["tokens"].shape[0],), i) for i, it in enumerate(items)])
    text_seg = torch.cat([torch.full((it["text"].shape[0],), i) for i, it in enumerate(items)])
    out["self_mask"] = (seg[:, None] == seg[None, :])[None, None]
    out["cross_mask"] = (seg[:, None] == text_seg[None, :])[None, None]
    return out


def split_for_cp(batch: dict, cp_rank: int, cp_size: int) -> dict:
    from loongforge_diffusion.wan.context_parallel import split_tokens

    if cp_size == 1:
        return batch
    out = dict(batch)
    for k in ("tokens", "positions", "target", "coef"):
        out[k] = split_tokens(batch[k], cp_rank, cp_size)
    if batch["timestep"].ndim == 2:
        out["timestep"] = split_tokens(batch["timestep"], cp_rank, cp_size)
    if batch["cross_mask"] is not None:
        out["cross_mask"] = split_tokens(batch["cross_mask"], cp_rank, cp_size, dim=2)
    return out


def token_loss_sum(pred: torch.Tensor, target: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``sum(coef * mean_over_channels((pred - target)^2))`` (fp32)."""
    return ((pred.float() - target.float()).pow(2).mean(-1) * coef).sum()
