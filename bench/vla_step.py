"""Pi0.5 training step, ours vs lerobot's PI05Pytorch, same batch and sizes (not a test).

    PYTHONPATH=<lerobot side dir, see scripts/lerobot_ref_env.sh> python3 -m uv run python bench/vla_step.py
    ... bench/vla_step.py --tiny         # CPU smoke with the tiny test sizes

Full size (GPU): PaliGemma (SigLIP So400m 224 px + Gemma 2B) + Gemma-300M action expert, chunk 50,
32-dim state/actions, 3 cameras, 200 prompt tokens (lerobot's tokenizer_max_length), bf16 weights
(lerobot's dtype=bfloat16 keeps the vision tower and norms in fp32; ours is all bf16), torch AdamW,
one step = forward + backward + optimizer step. Rows: samples/s (median of the timed steps), peak
memory, MFU = samples/s x model FLOPs per sample / peak FLOP/s, model FLOPs per sample =
loongforge_embodied.policy.train_flops_per_sample (6 x weights x tokens per stack + attention).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from loongforge_embodied.pi05.config import PiConfig, tiny_config
from loongforge_embodied.policy import VLAPolicy, train_flops_per_sample

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def lerobot_sizes(pc: PiConfig, tiny: bool):
    """Tiny runs: hand lerobot the tiny PaliGemma/Gemma sizes (it hard-codes the full ones)."""
    if not tiny:
        yield
        return
    from unittest import mock

    from lerobot.policies.pi05 import modeling_pi05 as m
    from transformers import GemmaConfig, PaliGemmaConfig

    sizes = iter([pc.vlm, pc.expert])

    def gemma(_variant):
        s = next(sizes)
        return m.GemmaConfig(s.width, s.depth, s.mlp_dim, s.num_heads, s.num_kv_heads, s.head_dim)

    v = pc.vision
    vision = dict(model_type="siglip_vision_model", hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                  num_hidden_layers=v.depth, num_attention_heads=v.num_heads, patch_size=v.patch_size,
                  image_size=v.image_size, vision_use_head=False)
    mapping = {"paligemma": lambda: PaliGemmaConfig(vision_config=vision), "gemma": GemmaConfig}
    with mock.patch.object(m, "CONFIG_MAPPING", mapping), mock.patch.object(m, "get_gemma_config", gemma):
        yield


def build_reference(pc: PiConfig, tiny: bool, dtype: str):
    from lerobot.policies.pi05 import modeling_pi05 as m
    from lerobot.policies.pi05.configuration_pi05 import PI05Config
    from transformers.models.paligemma.modeling_paligemma import PaliGemmaMultiModalProjector

    with lerobot_sizes(pc, tiny):
        ref = m.PI05Pytorch(PI05Config(chunk_size=pc.chunk_size, n_action_steps=pc.chunk_size, dtype=dtype,
                                       max_state_dim=pc.max_state_dim, max_action_dim=pc.max_action_dim,
                                       image_resolution=(pc.vision.image_size,) * 2))
    if tiny:  # lerobot sets the projector to the real 2048 width
        pg = ref.paligemma_with_expert.paligemma
        pg.config.vision_config.projection_dim = pc.vlm.width
        pg.model.multi_modal_projector = PaliGemmaMultiModalProjector(pg.config)
    return ref


def batch(pc: PiConfig, b: int, cams: int, text: int, device, dtype):
    g = torch.Generator().manual_seed(0)
    s = pc.vision.image_size
    return {
        "images": torch.randint(0, 256, (b, cams, 3, s, s), generator=g, dtype=torch.uint8),
        "image_masks": torch.ones(b, cams, dtype=torch.bool),
        "tokens": torch.randint(0, min(pc.vocab_size, 1000), (b, text), generator=g),
        "token_masks": torch.ones(b, text, dtype=torch.bool),
        "state": torch.zeros(b, pc.max_state_dim),
        "actions": torch.randn(b, pc.chunk_size, pc.max_action_dim, generator=g),
        "action_valid": torch.ones(b, pc.chunk_size, dtype=torch.bool),
        "noise": torch.randn(b, pc.chunk_size, pc.max_action_dim, generator=g),
        "time": torch.rand(b, generator=g) * 0.999 + 0.001,
    } | {}


def run(name, step, params, device, steps, warmup):
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-5)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        sync(device)
        t = time.perf_counter()
        loss = step()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del opt
    return statistics.median(times), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny sizes on CPU (smoke)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if args.tiny:
        pc = tiny_config("pi05", vocab_size=257152)
        pc = PiConfig(**{**pc.__dict__, "vision": pc.vision.__class__(**{**pc.vision.__dict__, "intermediate_size": 4304})})
        b, cams, text, wdtype = args.batch or 4, 2, 16, torch.float32
    else:
        pc = PiConfig(mode="pi05")
        b, cams, text, wdtype = args.batch or 8, 3, 200, torch.bfloat16
    data = {k: v.to(device) for k, v in batch(pc, b, cams, text, device, wdtype).items()}
    flops = train_flops_per_sample(pc, cams, text)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak_flops = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    rows = []

    torch.manual_seed(0)
    ours = VLAPolicy(pc, None, pc.max_action_dim).to(device=device, dtype=wdtype)
    t, mem = run("ours", lambda: ours(**data).mean(), list(ours.parameters()), device, args.steps, args.warmup)
    rows.append(("loongforge", t, mem))
    ours.to("cpu")  # free the device for the reference

    if not args.skip_reference:
        try:
            ref = build_reference(pc, args.tiny, "float32" if args.tiny else "bfloat16").to(device)
        except ImportError as exc:
            print(f"reference unavailable ({exc}); see scripts/lerobot_ref_env.sh")
        else:
            pixels = data["images"].float() / 127.5 - 1.0
            imgs = [pixels[:, k].to(device) for k in range(cams)]
            masks = [data["image_masks"][:, k] for k in range(cams)]

            def ref_step():
                return ref(imgs, masks, data["tokens"], data["token_masks"], data["actions"], data["noise"],
                           data["time"]).mean()

            t, mem = run("lerobot", ref_step, list(ref.parameters()), device, args.steps, args.warmup)
            rows.append(("lerobot 0.6.1 PI05Pytorch", t, mem))

    print(f"device: {gpu}; batch {b}, cameras {cams}, prompt {text}, chunk {pc.chunk_size}, "
          f"image {pc.vision.image_size}px; model FLOPs/sample {flops / 1e12:.3f} TFLOP")
    print("MFU = samples/s x model FLOPs per sample / peak bf16 FLOP/s"
          + (f" ({peak_flops / 1e12:.0f} TFLOP/s)" if peak_flops else " (no peak known for this device: n/a)"))
    print(f"{'implementation':28} {'step s':>8} {'samples/s':>10} {'peak GiB':>9} {'MFU':>7} {'vs ref':>7}")
    base = rows[-1][1] if len(rows) > 1 else None
    for name, t, mem in rows:
        sps = b / t
        m = f"{sps * flops / peak_flops:7.1%}" if peak_flops else f"{'n/a':>7}"
        speed = f"{base / t:6.2f}x" if base else f"{'-':>7}"
        print(f"{name:28} {t:8.3f} {sps:10.2f} {mem:9.2f} {m} {speed}")


if __name__ == "__main__":
    main()
