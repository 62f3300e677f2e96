"""Few-step sampling of a flow-matching video model (text -> latent video).

The step rule is diffusers' schedulers (``FlowMatchEulerDiscreteScheduler`` for ``euler``,
``UniPCMultistepScheduler`` with flow sigmas for ``unipc``, both with Wan's ``shift``); this
module adds classifier-free guidance and, for Wan2.2 A14B, the switch from the high-noise to the
low-noise expert at ``t = boundary_ratio * 1000``. The model is any ``velocity(x, t, text)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def scheduler(solver: str, shift: float):
    if solver == "euler":
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    if solver == "unipc":
        from diffusers import UniPCMultistepScheduler

        return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                       use_flow_sigmas=True, flow_shift=shift)
    raise ValueError(f"unknown solver {solver!r} (euler | unipc)")


def route_experts(high: Velocity, low: Velocity, boundary_ratio: float) -> Velocity:
    """A14B: the high-noise expert for ``t >= boundary_ratio * 1000``, the low-noise one below."""
    boundary = boundary_ratio * 1000

    def velocity(x, t, text):
        return high(x, t, text) if float(t.flatten()[0]) >= boundary else low(x, t, text)

    return velocity


@torch.no_grad()
def sample(velocity: Velocity, shape, text: torch.Tensor, null_text: torch.Tensor | None = None, *,
           steps: int = 8, guidance: float = 5.0, shift: float = 5.0, solver: str = "euler",
           generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Latents ``shape`` = [B, C, F, H, W] from pure noise in ``steps`` steps.

    ``guidance`` > 1 with a ``null_text`` runs the model on both and mixes
    ``v = v_null + guidance * (v_text - v_null)``.
    """
    sched = scheduler(solver, shift)
    sched.set_timesteps(steps, device=device)
    x = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    b = shape[0]
    use_cfg = null_text is not None and guidance != 1.0
    for t in sched.timesteps:
        tt = t.float().expand(b).to(x.device)
        v = velocity(x, tt, text).float()
        if use_cfg:
            v_null = velocity(x, tt, null_text.expand_as(text)).float()
            v = v_null + guidance * (v - v_null)
        x = sched.step(v, t, x).prev_sample
    return x
