"""Worker of ``test_image_split.py`` (run by torchrun with 2 processes): one process's encoder
gradients vs the split encoding's, averaged over the ranks."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from loongforge_vlm.components.image_split import GatherShards, pixel_rows, shares


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from loongforge_vlm.components import qwen3_merger, qwen3_vit
    from loongforge_vlm.data.qwen2_5_image import Qwen2_5ImageProcessor
    from loongforge_vlm.data.shapes import shape_image

    torch.manual_seed(0)
    enc = qwen3_vit.build({"depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
                           "num_position_embeddings": 16, "deepstack_visual_indexes": [0]})
    proj = qwen3_merger.build({"hidden_size": 24, "context_dim": 32, "num_deepstack": 1})
    proc = Qwen2_5ImageProcessor(patch_size=16, min_pixels=0, max_pixels=10**6)
    items = [proc(shape_image(w, h, c)) for w, h, c in ((64, 32, "red"), (96, 64, "blue"), (32, 32, "green"))]
    pixels, grid = torch.cat([p for p, _ in items]), torch.tensor([g for _, g in items])
    weight = torch.randn(sum(int(g.prod()) // 4 for g in grid), 24, generator=torch.Generator().manual_seed(1))

    def loss(main, deep):
        return (main * weight).sum() + (deep[0] * weight).square().sum()

    params = list(enc.parameters()) + list(proj.parameters())
    if rank == 0:  # one process: everything
        main, deep = proj(*enc(pixels, grid))
        full = torch.autograd.grad(loss(main, deep), params)
    rows = pixel_rows(pixels, grid)
    a, b = shares(rows, world)[rank]
    main, deep = proj(*enc(pixels[sum(rows[:a]):sum(rows[:b])], grid[a:b]))
    main, deep = GatherShards.apply(main, dist.group.WORLD), [GatherShards.apply(deep[0], dist.group.WORLD)]
    grads = torch.autograd.grad(loss(main, deep), params)
    averaged = []
    for g in grads:  # what finalize_model_grads does with average_gradients_across_tp_domain
        g = g.clone()
        dist.all_reduce(g, op=dist.ReduceOp.AVG)
        averaged.append(g)
    if rank == 0:
        torch.save({"full": full, "split": averaged, "share": (a, b)}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
