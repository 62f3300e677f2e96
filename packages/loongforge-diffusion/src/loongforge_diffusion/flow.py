"""Flow matching as Wan trains it, kept apart from the model (the model only predicts a velocity).

Noise level ``sigma`` in [0, 1], timestep ``t = 1000 * sigma`` (what the DiT's time embedding sees):

    x_t    = (1 - sigma) * x0 + sigma * noise
    target = noise - x0                              (the velocity d x_t / d sigma)
    loss   = weight(t) * mean((v_pred - target)^2)   per sample

Timestep sampling (config ``diffusion.*``): a base value ``u`` in (0, 1) is drawn ``uniform`` or
``logit_normal`` (``sigmoid(N(logit_mean, logit_std))``, SD3's choice), then shifted like Wan's
scheduler, ``sigma = shift * u / (1 + (shift - 1) * u)`` (``shift > 1`` spends more steps at high
noise). Draws are by inverse CDF from a uniform ``q`` restricted to ``[q_lo, q_hi]``, so an A14B
expert is trained exactly on its own range: the high-noise expert on ``t >= boundary_ratio * 1000``,
the low-noise one below (``diffusion.expert``). ``loss_weighting``: ``none`` or ``bell``
(``exp(-2 ((t - 500) / 1000)^2)`` normalised to mean 1 over the 1000 training timesteps, the
weighting DiffSynth-Studio trains Wan with).

Classifier-free guidance dropout: with probability ``cfg_dropout`` a sample's text embedding is
replaced by the null embedding (the text encoder's output for the empty prompt, stored by
``preprocess``). Wan2.2 TI2V image conditioning: with probability ``first_frame_prob`` a sample's
first latent frame stays clean (its tokens get ``t = 0``) and is left out of the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def unshift_sigma(sigma: torch.Tensor | float, shift: float):
    return sigma / (shift - (shift - 1) * sigma)


@dataclass(frozen=True)
class FlowMatching:
    """The training objective; built from the ``diffusion`` config section (:meth:`from_config`)."""

    shift: float = 5.0
    timestep_sampling: str = "uniform"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    loss_weighting: str = "none"  # none | bell
    cfg_dropout: float = 0.1
    first_frame_prob: float = 0.0
    t_min: float = 0.0  # timestep range (0..1000) this run trains, e.g. one A14B expert's
    t_max: float = 1000.0

    @classmethod
    def from_config(cls, d, boundary_ratio: float | None = None) -> FlowMatching:
        t_min, t_max = 0.0, float(NUM_TRAIN_TIMESTEPS)
        expert = getattr(d, "expert", "both")
        if expert != "both":
            if boundary_ratio is None:
                from loongforge.config import ConfigError

                raise ConfigError(f"config key 'diffusion.expert' = {expert!r} needs a model with "
                                  "'model.boundary_ratio' (Wan2.2 A14B)")
            b = boundary_ratio * NUM_TRAIN_TIMESTEPS
            t_min, t_max = (b, t_max) if expert == "high" else (t_min, b)
        return cls(shift=d.shift, timestep_sampling=d.timestep_sampling, logit_mean=d.logit_mean,
                   logit_std=d.logit_std, loss_weighting=d.loss_weighting, cfg_dropout=d.cfg_dropout,
                   first_frame_prob=d.first_frame_prob, t_min=t_min, t_max=t_max)

    # --- timesteps ---------------------------------------------------------------------------------
    def _cdf(self, u: float) -> float:
        if self.timestep_sampling == "uniform":
            return u
        if u <= 0.0 or u >= 1.0:
            return float(u >= 1.0)
        z = (math.log(u / (1 - u)) - self.logit_mean) / self.logit_std
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    def _inverse_cdf(self, q: torch.Tensor) -> torch.Tensor:
        if self.timestep_sampling == "uniform":
            return q
        if self.timestep_sampling != "logit_normal":
            raise ValueError(f"diffusion.timestep_sampling: unknown {self.timestep_sampling!r}")
        z = torch.special.ndtri(q.clamp(1e-6, 1 - 1e-6))
        return torch.sigmoid(self.logit_mean + self.logit_std * z)

    def sample_sigma(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` noise levels in this run's timestep range (float32)."""
        lo = self._cdf(float(unshift_sigma(self.t_min / NUM_TRAIN_TIMESTEPS, self.shift)))
        hi = self._cdf(float(unshift_sigma(self.t_max / NUM_TRAIN_TIMESTEPS, self.shift)))
        q = lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
        sigma = shift_sigma(self._inverse_cdf(q), self.shift)
        return sigma.clamp(self.t_min / NUM_TRAIN_TIMESTEPS, self.t_max / NUM_TRAIN_TIMESTEPS).float()

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        if self.loss_weighting == "none":
            return torch.ones_like(t)
        if self.loss_weighting != "bell":
            raise ValueError(f"diffusion.loss_weighting: unknown {self.loss_weighting!r}")
        grid = torch.arange(NUM_TRAIN_TIMESTEPS, dtype=torch.float32)
        norm = torch.exp(-2 * ((grid - 500) / 1000) ** 2).mean()
        return torch.exp(-2 * ((t.float() - 500) / 1000) ** 2) / norm

    # --- one training batch ------------------------------------------------------------------------
    def prepare(self, x0: torch.Tensor, text: torch.Tensor, null_text: torch.Tensor,
                generator: torch.Generator | None = None, per_token: bool = False):
        """Noisy inputs and targets for clean latents ``x0`` [B, C, F, H, W] and text [B, L, D].

        Returns a dict: ``x_t``, ``timestep`` [B], ``frame_t`` [B, F] (per latent frame; 0 for a
        clean first frame; :meth:`token_timesteps` expands it per token), ``target``, ``text`` (after CFG dropout), ``frame_mask`` [B, F] (1 = in
        the loss), ``sigma`` [B] and ``weight`` [B]. All random draws come from ``generator``.
        """
        b, f = x0.shape[0], x0.shape[2]
        sigma = self.sample_sigma(b, generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
        drop = torch.rand(b, generator=generator) < self.cfg_dropout
        first = torch.rand(b, generator=generator) < self.first_frame_prob
        s = sigma.view(b, 1, 1, 1, 1).to(x0.dtype)
        x_t = (1 - s) * x0 + s * noise
        frame_mask = torch.ones(b, f, device=x0.device)
        frame_sigma = sigma[:, None].expand(b, f).clone()
        if first.any():
            if not per_token:
                raise ValueError("diffusion.first_frame_prob > 0 needs per-token timesteps (model.expand_timesteps)")
            idx = first.nonzero().flatten().to(x0.device)
            x_t[idx, :, 0] = x0[idx, :, 0]
            frame_mask[idx, 0] = 0.0
            frame_sigma[idx, 0] = 0.0
        if drop.any():
            text = torch.where(drop.view(b, 1, 1).to(text.device), null_text.to(text.dtype).expand_as(text), text)
        t = sigma * NUM_TRAIN_TIMESTEPS
        return {"x_t": x_t, "timestep": t, "frame_t": frame_sigma * NUM_TRAIN_TIMESTEPS, "target": noise - x0,
                "text": text, "frame_mask": frame_mask, "sigma": sigma, "weight": self.weight(t)}

    @staticmethod
    def token_timesteps(frame_t: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Per-token timesteps [B, f*h*w] from per-latent-frame ones [B, f] (frame-major tokens)."""
        return frame_t.repeat_interleave(grid[1] * grid[2], dim=1)

    def loss_sum(self, pred: torch.Tensor, target: torch.Tensor, frame_mask: torch.Tensor,
                 weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sum over samples of weight * masked per-sample MSE, number of samples)``."""
        err = (pred.float() - target.float()).pow(2).mean(dim=(1, 3, 4))  # [B, F]
        per_sample = (err * frame_mask).sum(1) / frame_mask.sum(1).clamp(min=1)
        return (per_sample * weight.to(per_sample.device)).sum(), torch.tensor(float(pred.shape[0]))
