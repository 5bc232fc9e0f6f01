"""Conditional generation on a collage: known pixels kept while the rest is generated (plain torch).

DiffCollage (Sec. 4.3) names two ways to condition a sample on known pixels y under a mask H:
- Replacement: every step the x0-prediction (and x_t) is projected onto the known pixels. ComfyUI's
  noise mask does exactly this (KSamplerX0Inpaint), so the sampler leaves it to ComfyUI.
- Reconstruction: the gradient of ||H x0(x_t) - y||^2 is added to the score. In denoised form, as in
  Video Diffusion Models (Ho et al. 2022, eq. 7) written in ComfyUI's VE coordinates:
      D_eff = D - (w / 2) grad_x ||H D(x) - y||^2
  With w = 1 and a denoiser whose Jacobian is the identity on the known cells (small sigma), D_eff
  equals y there: Replacement is the limit; at large sigma the Jacobian, hence the pull, is small.
Both run jointly over the whole collage (one step for every region), or autoregressively: one
window after another, each a full sampling run outpainting from what is known so far (the paper's
baselines).
"""
from __future__ import annotations

import torch

from .merge import gather, scatter_set
from .plans import RegionPlan

METHODS = ("replacement", "reconstruction")
ORDERS = ("joint", "autoregressive")


def reconstruction_correction(x: torch.Tensor, denoise, known: torch.Tensor, mask: torch.Tensor,
                              weight: float) -> tuple[torch.Tensor, float]:
    """(what to subtract from D(x), ||H D(x) - y||) for one region: (w / 2) grad_x ||H D(x) - y||^2.
    `denoise` must be differentiable; `mask` is 1 on known cells."""
    x = x.detach().clone().requires_grad_(True)
    residual = (denoise(x) - known) * mask
    loss = residual.pow(2).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return (weight / 2) * grad.detach(), float(loss.detach().sqrt())


def autoregressive_order(plan: RegionPlan, known: torch.Tensor) -> list[int]:
    """The factors of `plan` in the order window-after-window outpainting samples them: each next the
    one sharing the most cells with what is known so far (the known pixels, then the windows done);
    ties and a start with nothing known go by factor number. `known`: (H, W) canvas, nonzero = known."""
    done = known.bool().clone()
    # factors that count in the merge (a cubemap's anchor window may sit in the plan at coefficient 0)
    factors = [i for i in range(len(plan.regions))
               if (not plan.factors_of or plan.factors_of[i] == (i,)) and plan.coefficients[i] != 0]
    order = []
    while factors:
        best = max(factors, key=lambda i: (int(gather(done, plan.regions[i]).sum()), -i))
        order.append(best)
        factors.remove(best)
        ones = torch.ones(plan.regions[best].size, dtype=torch.bool)
        scatter_set(done, plan.regions[best], ones)
    return order

