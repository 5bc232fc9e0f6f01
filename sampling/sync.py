"""The SyncDiffusion / ControlSync synchronisation step (plain torch; the model is a callable).

Per synced step, every non-anchor window i moves by one gradient step
    x_i <- x_i - w_t * grad_{x_i} LPIPS(D(x0_i(x_i)), stopgrad(D(x0_anchor)))
before it is denoised; the anchor is decoded once and not moved.

The step in each model's own parameterisation. ComfyUI samples x = alpha x0 + sigma eps, with
    "ve"   (eps, v-prediction, x0 and EDM models): alpha = 1,         x = x0 + sigma eps
    "flow" (CONST: SD3, Flux, Qwen-Image, ...):    alpha = 1 - sigma, x = (1 - sigma) x0 + sigma eps
while the papers step in the variance-preserving latent z = alpha_vp x0 + sigma_vp eps with
alpha_vp^2 + sigma_vp^2 = 1. Dividing by the norm c = sqrt(alpha^2 + sigma^2) maps one onto the
other: z = x / c (for "ve" this is the DDPM latent, sigma^2 = (1 - a) / a). Since x = c z,
grad_z L = c grad_x L, and the paper's step z <- z - w grad_z L is, multiplied by c,
    x <- x - w c^2 grad_x L,   c^2 = alpha^2 + sigma^2:   1 + sigma^2 ("ve"), (1 - sigma)^2 + sigma^2 ("flow"),
so a weight of 20 means the paper's 20 in every family (`step_scale`). sigma is the sampler's own
sigma (after any shift of the schedule, as SD3 and Flux use): the map is pointwise in sigma.

The fold into the denoised output. ComfyUI's first-order deterministic step from x with denoised D is
    x_next = x + (sigma_next - sigma) (x - D) / sigma = r x + (1 - r) D,   r = sigma_next / sigma,
for every parameterisation (k-diffusion `euler`; ComfyUI's `ddim` is that same Euler step). For "ve"
it is DDIM with eta 0; for "flow" (x - D) / sigma = eps - x0 is the flow's velocity, so it is the
flow's Euler step - the same formula, whatever the schedule's shift (the shift only moves the sigmas).
Stepping each window from its moved latent x - delta_i and averaging equals one step from x with
D_eff = mean D(x - delta_i) - r / (1 - r) * mean delta_i, so the update folds into the denoised output
the sampler sees: exact for euler and ddim in both parameterisations, approximate for multistep,
ancestral and SDE samplers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

LOSS_NETS = ("vgg", "alex")


@dataclass(frozen=True)
class SyncSchedule:
    """w_t = weight * decay^t for the first `steps` steps of a `reference_steps`-step schedule
    (the papers: 20, 0.95, 10 of 50). At N steps the sync covers the same part of the noise
    schedule: round(steps * N / reference_steps) steps, decaying by decay^(reference_steps / N) per step."""
    weight: float = 20.0
    decay: float = 0.95
    steps: int = 10
    reference_steps: int = 50

    def synced_steps(self, total: int) -> int:
        return round(self.steps * total / self.reference_steps)

    def weight_at(self, index: int, total: int) -> float:
        if index < 0 or index >= self.synced_steps(total):
            return 0.0
        return self.weight * self.decay ** (index * self.reference_steps / total)


def step_index(sigma: float, schedule: torch.Tensor) -> int | None:
    """The index of `sigma` in the sampler's schedule, or None for an intermediate evaluation
    (second-order samplers evaluate between schedule points; those calls are not synced)."""
    close = torch.isclose(schedule.float(), torch.tensor(float(sigma)), rtol=1e-5, atol=1e-8).nonzero()
    if len(close) == 0 or int(close[0]) >= len(schedule) - 1:
        return None
    return int(close[0])


PARAMETERISATIONS = ("ve", "flow")


def step_scale(parameterisation: str, sigma: float) -> float:
    """alpha^2 + sigma^2: the paper's variance-preserving step size in the sampler's space (see module doc)."""
    sigma = float(sigma)
    if parameterisation == "ve":
        return 1.0 + sigma ** 2
    if parameterisation == "flow":
        return (1.0 - sigma) ** 2 + sigma ** 2
    raise ValueError(f"unknown parameterisation {parameterisation!r}; known: {', '.join(PARAMETERISATIONS)}")


def lpips_input(decoded: torch.Tensor) -> torch.Tensor:
    """The reference code's path decoded -> /2 + 0.5 -> clamp(0, 1) -> *2 - 1: a clamp to [-1, 1]
    whose gradient is zero at saturated pixels."""
    return decoded.clamp(-1.0, 1.0)


def window_sync_gradient(x: torch.Tensor, denoise: Callable, decode: Callable, loss: Callable,
                         anchor_image: torch.Tensor, through_model: bool = True):
    """(loss, grad_x loss) of one window at latent `x`.

    denoise(x) -> x0 prediction (with CFG); decode(x0) -> image in [-1, 1]; loss(image, anchor) -> scalar.
    through_model=False skips the Jacobian of the denoiser (x0 moves one to one with x): the fast mode.
    """
    x = x.detach().requires_grad_(True)
    if through_model:
        x0 = denoise(x)
    else:
        with torch.no_grad():
            x0_fixed = denoise(x.detach())
        x0 = x0_fixed + (x - x.detach())
    value = loss(lpips_input(decode(x0)), anchor_image).sum()
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


def sync_deltas(window_latents: list[torch.Tensor], anchor: int, weight: float, sigma: float,
                gradient: Callable[[int, torch.Tensor], tuple], parameterisation: str) -> tuple[list[torch.Tensor], list[int]]:
    """delta_i = w_t step_scale(parameterisation, sigma) grad_i for every window (zero for the anchor),
    computed one window at a time so only one gradient graph is alive. A window whose loss or gradient
    is not finite gets no update; its index is returned so the caller can warn."""
    scale = weight * step_scale(parameterisation, sigma)
    deltas, skipped = [], []
    for i, x in enumerate(window_latents):
        if i == anchor or weight == 0.0:
            deltas.append(torch.zeros_like(x))
            continue
        value, grad = gradient(i, x)
        if not (math.isfinite(float(value)) and bool(torch.isfinite(grad).all())):
            skipped.append(i)
            deltas.append(torch.zeros_like(x))
            continue
        deltas.append((scale * grad).to(x.dtype))
    return deltas, skipped


def fold_update(denoised: torch.Tensor, merged_delta: torch.Tensor, r: float) -> torch.Tensor:
    """D_eff = D(x - delta) - r / (1 - r) * delta: the denoised output whose first-order step from the
    unmoved canvas equals the average of the windows' steps from their moved latents."""
    if r >= 1.0:
        raise ValueError(f"sigma_next / sigma = {r} >= 1: the schedule does not decrease")
    return denoised - (r / (1.0 - r)) * merged_delta
