"""Label diffusion for A&D's denoising decoder (methods.md 2.2; code ``xmed-lab/GenericSSL``).

A one-hot label is encoded as x_0 = 2 onehot - 1 (values in {-1, 1}) and noised with a linear beta schedule
(T = 1000 steps from 1e-4 to 0.02): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. The denoising network
predicts x_0 directly (the released ``START_X`` mean type). Pseudo-labels come from deterministic DDIM
(eta = 0) over ``steps`` evenly spaced timesteps (10: t = 999, 888, ..., 111, 0), the network's x_0 clamped
to [-1, 1] at every step; the result is the last step's x_0 prediction.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch


def linear_alphas_cumprod(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
                          ) -> torch.Tensor:
    """abar_t = prod_{s <= t} (1 - beta_s) for linearly spaced betas (float64, length ``num_steps``)."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def encode_label(onehot: torch.Tensor) -> torch.Tensor:
    """x_0 = 2 onehot - 1."""
    return 2.0 * onehot.float() - 1.0


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] per sample, shaped to broadcast over ``like`` (B, C, *spatial), in ``like``'s dtype."""
    v = values.to(like.device)[t.to(like.device).long()]
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def q_sample(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor,
             noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Forward noising x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (eps standard normal unless given);
    ``t`` holds one timestep per sample."""
    noise = torch.randn_like(x0) if noise is None else noise
    abar = _at(alphas_cumprod, t, x0)
    return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise


def spaced_timesteps(num_steps: int = 1000, sample_steps: int = 10) -> List[int]:
    """The evenly spaced timesteps of respacing ``num_steps`` to ``sample_steps`` (1000 -> 10: 0, 111, ..., 999),
    in increasing order."""
    if not 1 <= sample_steps <= num_steps:
        raise ValueError(f"sample_steps must be in [1, {num_steps}], not {sample_steps}")
    if sample_steps == 1:
        return [num_steps - 1]
    stride = (num_steps - 1) / (sample_steps - 1)
    return sorted({round(i * stride) for i in range(sample_steps)})


@torch.no_grad()
def ddim_sample(predict_x0: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape, alphas_cumprod: torch.Tensor,
                sample_steps: int = 10, noise: Optional[torch.Tensor] = None, clip: bool = True,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from x_T = ``noise`` (standard normal unless given) over the spaced
    timesteps, largest first. ``predict_x0(x_t, t)`` is the network's x_0 prediction, called with the original
    timesteps (one per sample); it is clamped to [-1, 1] when ``clip``. Each step moves to the next smaller
    spaced timestep s: x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps with eps = (x_t - sqrt(abar_t) x0) /
    sqrt(1 - abar_t), abar of the step after t = 0 being 1. Returns the last x_0 prediction."""
    x = torch.randn(shape, device=device) if noise is None else noise
    steps = spaced_timesteps(len(alphas_cumprod), sample_steps)[::-1]
    x0 = x
    for i, t in enumerate(steps):
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x0 = predict_x0(x, tt).float()
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
        abar_t = _at(alphas_cumprod, tt, x)
        eps = (x - abar_t.sqrt() * x0) / (1.0 - abar_t).sqrt()
        if i + 1 < len(steps):
            abar_s = _at(alphas_cumprod, torch.full_like(tt, steps[i + 1]), x)
        else:
            abar_s = torch.ones_like(abar_t)
        x = abar_s.sqrt() * x0 + (1.0 - abar_s).sqrt() * eps
    return x0
