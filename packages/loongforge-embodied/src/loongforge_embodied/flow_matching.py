"""Flow matching for action chunks, kept apart from the network (openpi's convention).

``x_t = t * noise + (1 - t) * actions``, target velocity ``u = noise - actions``; the network
predicts ``v_t``; time ``t = Beta(alpha, beta) * scale + offset`` (openpi: Beta(1.5, 1) * 0.999
+ 0.001, so t in (0.001, 1]); sampling integrates from t = 1 (noise) to t = 0 with Euler steps
``dt = -1 / steps``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlowMatching:
    alpha: float = 1.5
    beta: float = 1.0
    scale: float = 0.999
    offset: float = 0.001

    def sample_time(self, batch: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """[batch] float32 times. Beta(a, b) drawn as X / (X + Y) of two Gamma draws (the definition
        torch's Beta sampler uses), so a ``generator`` makes it reproducible per rank."""
        a = torch.full((batch,), self.alpha, dtype=torch.float32)
        b = torch.full((batch,), self.beta, dtype=torch.float32)
        if generator is None:
            x = torch.distributions.Beta(a, b).sample()
        else:
            ga, gb = torch._standard_gamma(a, generator=generator), torch._standard_gamma(b, generator=generator)
            x = ga / (ga + gb)
        return (x * self.scale + self.offset).to(device=device, dtype=torch.float32)

    @staticmethod
    def interpolate(actions: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """-> (x_t, target velocity u)."""
        te = t[:, None, None].to(actions.dtype)
        return te * noise + (1 - te) * actions, noise - actions

    @staticmethod
    def loss_sum(v: torch.Tensor, u: torch.Tensor, action_dim: int, pad: torch.Tensor | None = None):
        """Squared error per sample, averaged over the sample's valid steps (``pad`` [B, chunk]
        True where the step is real, False past the episode end) and its first ``action_dim``
        dims, then summed over the batch. -> (loss_sum, number of samples). With no padding the
        mean over samples equals ``F.mse_loss`` over the unpadded dims (lerobot's loss)."""
        err = (v.float() - u.float())[..., :action_dim].pow(2).mean(-1)
        if pad is None:
            pad = torch.ones(err.shape, dtype=torch.bool, device=err.device)
        w = pad.to(err.dtype)
        per_sample = (err * w).sum(1) / w.sum(1).clamp(min=1)
        return per_sample.sum(), err.shape[0]

    @staticmethod
    @torch.no_grad()
    def euler(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
              steps: int = 10) -> torch.Tensor:
        """Integrate ``velocity(x_t, t)`` from t = 1 to 0 in ``steps`` Euler steps (openpi's loop)."""
        dt = -1.0 / steps
        x = noise
        for k in range(steps):
            t = torch.full((x.shape[0],), 1.0 + k * dt, dtype=torch.float32, device=x.device)
            x = x + dt * velocity(x, t)
        return x
