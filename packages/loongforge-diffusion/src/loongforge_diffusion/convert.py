"""``loongforge convert wan-diffusers-to-ours SRC DST`` / ``wan-ours-to-diffusers SRC DST``."""

from __future__ import annotations

import argparse


def _args(argv, prog):
    p = argparse.ArgumentParser(prog=f"loongforge convert {prog}")
    p.add_argument("src", help="source folder")
    p.add_argument("dst", help="output folder")
    p.add_argument("--expand-timesteps", action="store_true", help="Wan2.2 TI2V: per-token timesteps")
    p.add_argument("--boundary-ratio", type=float, default=None, help="Wan2.2 A14B expert switch")
    return p.parse_args(argv)


def diffusers_to_ours(argv) -> int:
    from loongforge_diffusion.wan.weights import diffusers_to_ours as convert

    a = _args(argv, "wan-diffusers-to-ours")
    wan = convert(a.src, a.dst, expand_timesteps=a.expand_timesteps, boundary_ratio=a.boundary_ratio)
    print(f"wrote {a.dst} ({wan.num_layers} blocks, hidden {wan.hidden_size})")
    return 0


def ours_to_diffusers(argv) -> int:
    from loongforge_diffusion.wan.weights import ours_to_diffusers as convert

    a = _args(argv, "wan-ours-to-diffusers")
    convert(a.src, a.dst)
    print(f"wrote {a.dst}")
    return 0
