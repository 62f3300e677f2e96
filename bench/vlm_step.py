"""One VLM training step (forward, backward, AdamW) on one GPU: LoongForge vs HF Transformers.

    PYTHONPATH=$(ls -d packages/*/src | tr '\\n' :) python bench/vlm_step.py            # Qwen3-VL-2B, seq 8192
    ... python bench/vlm_step.py --config qwen3_vl_4b --rows ours,hf
    ... python bench/vlm_step.py --rows ours,ours:nokernels,ours:mbs=2,hf
    ... python bench/vlm_step.py --tiny                                                 # CPU smoke run

The batch (the same for every row, fresh random pixels and text each step): per sample
``--images`` images of ``--image-size`` HxW and ``--videos`` clips of ``--video-frames`` frames of
``--video-size``, each frame pair one temporal patch behind its timestamp text, the rest of the
``--seq`` tokens text; loss on the text tokens.

Rows (``name:opt:opt=value``):

- ``ours``: ``VLMProvider`` from the run config (Qwen3-ViT x merger with DeepStack x the qwen3 LLM's
  megatron-core GPTModel with the CUDA backend's layer spec and kernels), bf16 with megatron-core
  DDP (fp32 gradient buffer) and optimizer (fp32 master weights, fused AdamW), as the trainer.
  Options: ``nokernels`` (the plain local spec), ``mbs=N``, ``recompute`` (the encoder's
  activations recomputed in backward).
- ``hf``: ``Qwen3VLForConditionalGeneration`` from the same config, bf16, ``attn_implementation="sdpa"``,
  ``torch.optim.AdamW`` (bf16 parameters and states); ``mbs=N``.

Reported: samples/s (median step), peak memory, and MFU with the FLOPs of one sample printed next
to it: 6 N_llm S + 6 L H S^2 (causal attention) for the LLM, 6 N_vit P + 12 L_v H_v sum(frame
patches^2) for the ViT (P patches; attention within each frame) and 6 N_merger P / 4 for the
mergers, over 989 TFLOP/s (H100 bf16 dense).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_step import PEAK, Clock, megatron_world, parse_row, time_steps  # noqa: E402

IMAGE, VIDEO, START, END = "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"


def provider_for(config: str, overrides: list[str]):
    from loongforge.config import compose_config
    from loongforge_vlm.provider import VLMProvider

    return VLMProvider(compose_config(config, overrides).model)


class Batch:
    """Token ids, pixels and grids of one micro-batch, drawn afresh per step."""

    def __init__(self, provider, args, mbs: int, device: str):
        e = provider.encoder_cfg
        self.p, self.m, self.t = e.get("patch_size", 16), e.get("spatial_merge_size", 2), e.get("temporal_patch_size", 2)
        self.dim = 3 * self.t * self.p * self.p
        self.mbs, self.seq, self.device, self.args = mbs, args.seq, device, args
        self.image_id, self.video_id = provider.image_token_id, provider.video_token_id
        self.start, self.end = provider.section["vision_start_token_id"], provider.section["vision_end_token_id"]
        self.vocab = provider.llm.args.vocab_size
        ih, iw = (int(x) // (self.p * self.m) * self.m for x in args.image_size.split("x"))
        vh, vw = (int(x) // (self.p * self.m) * self.m for x in args.video_size.split("x"))
        self.image_grid = (1, ih, iw)
        self.video_grid = (-(-args.video_frames // self.t), vh, vw)

    def ids_row(self) -> list[int]:
        top = min(self.vocab, self.image_id, self.video_id, self.start, self.end)  # text: no vision token ids
        rnd = lambda n: torch.randint(0, top, (n,)).tolist()  # noqa: E731
        m2 = self.m * self.m
        ids = rnd(8)
        for _ in range(self.args.images):
            ids += [self.start] + [self.image_id] * (self.image_grid[1] * self.image_grid[2] // m2) + [self.end] + rnd(4)
        for _ in range(self.args.videos):
            t, h, w = self.video_grid
            for _ in range(t):  # "<x.x seconds>" (random ids stand in) + the frame's tokens
                ids += rnd(6) + [self.start] + [self.video_id] * (h * w // m2) + [self.end]
        if len(ids) + 1 > self.seq + 1:
            raise SystemExit(f"the vision tokens ({len(ids)}) do not fit --seq {self.seq}")
        return ids + rnd(self.seq + 1 - len(ids))

    def draw(self) -> dict:
        from loongforge_vlm.data.positions import mrope_positions

        rows = torch.tensor([self.ids_row() for _ in range(self.mbs)])
        tokens, labels = rows[:, :-1], rows[:, 1:]
        images = [self.image_grid] * (self.args.images * self.mbs)
        videos = [self.video_grid] * (self.args.videos * self.mbs)
        n_img = sum(t * h * w for t, h, w in images)
        n_vid = sum(t * h * w for t, h, w in videos)
        mrope = torch.stack([mrope_positions(tokens[b], images[:self.args.images], self.image_id, self.m,
                                             video_token_id=self.video_id, video_grid_thw=videos[:self.args.videos])
                             for b in range(self.mbs)])
        vision = (labels == self.image_id) | (labels == self.video_id)  # no loss on predicting vision tokens
        d = self.device
        out = {"tokens": tokens.to(d), "labels": labels.to(d), "loss_mask": (~vision).float().to(d),
               "mrope_position_ids": mrope.to(d),
               "mm_token_type_ids": ((tokens == self.image_id).int() + 2 * (tokens == self.video_id).int()).to(d)}
        if images:
            out.update(pixel_values=torch.randn(n_img, self.dim, device=d), image_grid_thw=torch.tensor(images, device=d))
        if videos:
            out.update(pixel_values_videos=torch.randn(n_vid, self.dim, device=d),
                       video_grid_thw=torch.tensor(videos, device=d))
        return out

    def flops(self, provider, model) -> tuple[float, str]:
        """FLOPs of one sample (forward + backward) and the formula's numbers."""
        a = provider.llm.args
        n_llm = provider.llm.num_parameters()
        n_vit = sum(p.numel() for p in model.image_encoder.parameters())
        n_merge = sum(p.numel() for p in model.image_projector.parameters())
        frames = [(h * w) for _ in range(self.args.images) for _, h, w in [self.image_grid]]
        frames += [h * w for _ in range(self.args.videos) for _ in range(self.video_grid[0]) for h, w in [self.video_grid[1:]]]
        patches = sum(frames)
        e = provider.encoder_cfg
        llm = 6 * n_llm * self.seq + 6 * a.num_hidden_layers * a.hidden_size * self.seq ** 2
        vit = 6 * n_vit * patches + 12 * e["depth"] * e["hidden_size"] * sum(f * f for f in frames)
        merge = 6 * n_merge * patches / 4
        text = (f"6*{n_llm:.4g}*S + 6*{a.num_hidden_layers}*{a.hidden_size}*S^2 (S={self.seq}) + "
                f"6*{n_vit:.4g}*P + 12*{e['depth']}*{e['hidden_size']}*sum(frame^2) (P={patches} patches) + "
                f"6*{n_merge:.4g}*P/4")
        return llm + vit + merge, text


def row_ours(provider, args, opts: dict) -> dict:
    from loongforge.model_provider import RunSettings
    from loongforge.trainer.optim import use_fused_adam
    from loongforge_cuda.backend import CudaBackend
    from loongforge_cuda.plugin import loongforge_register_kernels
    from loongforge_kernels.plugin import KERNELS
    from loongforge_vlm.inputs import model_inputs
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    mbs, cuda = int(opts.get("mbs", args.mbs)), args.device == "cuda"
    backend = CudaBackend()
    if not opts.get("nokernels"):
        backend.configure_kernels([*KERNELS, *loongforge_register_kernels()], [])
    provider.encoder_parallel = type(provider.encoder_parallel)(recompute=bool(opts.get("recompute")))
    run = RunSettings(bf16=cuda, seq_length=args.seq)
    with megatron_world(backend, cuda):
        torch.manual_seed(0)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        config = provider.transformer_config(run)
        if opts.get("nokernels"):
            from loongforge.modules.layer_spec import local_sdpa_spec

            backend.layer_spec = lambda config, model_cfg: local_sdpa_spec(config)
        inner = provider.build(config, run, backend=backend).to(args.device)
        model = Float16Module(config, inner) if cuda else inner
        model = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
        optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=1e-5, weight_decay=0.1, clip_grad=1.0, bf16=cuda,
            params_dtype=torch.bfloat16 if cuda else torch.float32), [model])
        use_fused_adam(optimizer, adamw_step=backend.kernel("adamw_step") if cuda else None)
        batch = Batch(provider, args, mbs, args.device)

        def step():
            b = batch.draw()
            model.zero_grad_buffer()
            optimizer.zero_grad()
            seq = b["tokens"].shape[1]
            pos = torch.arange(seq, device=args.device).expand(mbs, seq)
            per_token = model(b["tokens"], pos, None, labels=b["labels"], **model_inputs(b, args.device))
            loss = (per_token.float() * b["loss_mask"]).sum() / b["loss_mask"].sum()
            loss.backward()
            model.finish_grad_sync()
            mid = clock.mark()
            ok, _, _ = optimizer.step()
            assert ok, "optimizer step skipped"
            return loss.detach(), mid

        clock = Clock(cuda)
        result = time_steps(step, clock, args.warmup, args.steps)
        flops, formula = batch.flops(provider, inner)
    result.update(samples=mbs, flops_sample=flops, formula=formula, mbs=mbs)
    return result


def row_hf(provider, args, opts: dict) -> dict:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    mbs, cuda = int(opts.get("mbs", args.mbs)), args.device == "cuda"
    cfg = {k: v for k, v in provider.hf_config().items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = Qwen3VLForConditionalGeneration._from_config(Qwen3VLConfig(**cfg), attn_implementation="sdpa",
                                                         torch_dtype=dtype).to(args.device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
    batch = Batch(provider, args, mbs, args.device)

    def step():
        b = batch.draw()
        optimizer.zero_grad(set_to_none=True)
        labels = b["tokens"].clone()  # HF shifts the labels itself: position t + 1 is the target of t
        labels[:, 1:] = labels[:, 1:].masked_fill(b["loss_mask"][:, :-1] == 0, -100)
        kw = {k: b[k].to(dtype) if k.startswith("pixel") else b[k]
              for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw") if k in b}
        loss = model(input_ids=b["tokens"], mm_token_type_ids=b["mm_token_type_ids"], labels=labels, **kw).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        mid = clock.mark()
        optimizer.step()
        return loss.detach(), mid

    clock = Clock(cuda)
    result = time_steps(step, clock, args.warmup, args.steps)
    result.update(samples=mbs, mbs=mbs)
    return result


ROWS = {"ours": row_ours, "hf": row_hf}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="qwen3_vl_2b", help="a VLM run config (loongforge_vlm/configs)")
    parser.add_argument("--rows", default="ours,hf")
    parser.add_argument("--mbs", type=int, default=1)
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--image-size", default="768x1024")
    parser.add_argument("--videos", type=int, default=1)
    parser.add_argument("--video-frames", type=int, default=16)
    parser.add_argument("--video-size", default="448x448")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: qwen3_vl_tiny, seq 256, 2 steps")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    overrides = []
    if args.tiny:
        args.config, args.device, args.seq, args.warmup, args.steps = "qwen3_vl_tiny", "cpu", 256, 1, 2
        args.image_size, args.video_size, args.video_frames = "64x96", "64x64", 4
        overrides = ["model.image_token_id=1029", "model.video_token_id=1028", "model.vision_start_token_id=1030",
                     "model.vision_end_token_id=1031"]
    provider = provider_for(args.config, overrides)
    results, fps = [], None
    for spec in args.rows.split(","):
        kind, opts = parse_row(spec)
        t0 = time.time()
        try:
            r = ROWS[kind](provider, args, opts)
            r.update(row=spec, wall_s=time.time() - t0, samples_s=r["samples"] / (r["ms"] / 1e3))
            fps = r.get("flops_sample") or fps
            print(f"[{spec}] {json.dumps(r, default=str)}", flush=True)
        except Exception as exc:  # one failing row (OOM) must not hide the others
            traceback.print_exc()
            r = {"row": spec, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        results.append(r)
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (smoke run, no meaningful speed)"
    formula = next((r["formula"] for r in results if "formula" in r), "?")
    print(f"\n{args.config}, seq {args.seq}, per sample {args.images} image(s) {args.image_size} + {args.videos} "
          f"video(s) {args.video_frames}x{args.video_size}; {device}; median of {args.steps} steps after {args.warmup} warm-up")
    print(f"MFU = samples/s x FLOPs/sample / {PEAK / 1e12:.0f} TFLOP/s; FLOPs/sample = {formula} = "
          f"{(fps or 0) / 1e12:.2f} TFLOP")
    base = next((r for r in results if r.get("row") == "hf" and "ms" in r), None)
    print(f"{'row':24} {'mbs':>3} {'ms/step':>9} {'samples/s':>10} {'vs hf':>6} {'MFU':>6} {'peak GiB':>9}  loss")
    for r in results:
        if "error" in r:
            print(f"{r['row']:24} FAILED: {r['error']}")
            continue
        mfu = r["samples_s"] * (fps or 0) / PEAK
        speed = f"{r['samples_s'] / base['samples_s']:.2f}x" if base else "-"
        print(f"{r['row']:24} {r['mbs']:>3} {r['ms']:>9.1f} {r['samples_s']:>10.3f} {speed:>6} {100 * mfu:>5.1f}% "
              f"{r['peak_gib']:>9.1f}  {r['loss'][0]:.3f}->{r['loss'][1]:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
