"""Conditional generation on a collage: known pixels kept while the rest is generated (plain torch).

DiffCollage (Sec. 4.3) names two ways to condition a sample on known pixels y under a mask H:
- Replacement: every step the x0-prediction (and x_t) is projected onto the known pixels. ComfyUI's
  noise mask does exactly this (KSamplerX0Inpaint), so the sampler leaves it to ComfyUI.
- Reconstruction: the gradient of ||H x0(x_t) - y||^2 is added to the score. In denoised form, as in
  Video Diffusion Models (Ho et al. 2022, eq. 7) written in ComfyUI's VE coordinates:
      D_eff = D - (w / 2) grad_x ||H D(x) - y||^2
  With w = 1 and a denoiser whose Jacobian is the identity on the known cells (small sigma), D_eff
  equals y there: Replacement is the limit; at large sigma the Jacobian, hence the pull, is small.
  On a collage D is the merged prediction x0(x) = sum_R c_R m_R D_R(x_R) / N (N = sum_R c_R m_R per
  cell), and its gradient is, by the chain rule through the merge,
      grad_x ||H x0 - y||^2 = sum_R scatter_R( J_R^T gather_R(2 H^2 (x0 - y) c_R m_R / N) ),
  one vector-Jacobian product per region whose merge weight touches a known cell
  (`collage_reconstruction`). The older per-region form (`reconstruction_correction`, each region
  pulled by its own residual D_R - y, then merged) is not this gradient once regions overlap.
Both run jointly over the whole collage (one step for every region), or autoregressively: one
window after another, each a full sampling run outpainting from what is known so far (the paper's
baselines).
"""
from __future__ import annotations

import torch

from .merge import gather, normalizer, region_weights, scatter_add, scatter_set
from .plans import RegionPlan

METHODS = ("replacement", "reconstruction")
ORDERS = ("joint", "autoregressive")


def reconstruction_correction(x: torch.Tensor, denoise, known: torch.Tensor, mask: torch.Tensor,
                              weight: float) -> tuple[torch.Tensor, float]:
    """(what to subtract from D(x), ||H D(x) - y||) for one region: (w / 2) grad_x ||H D(x) - y||^2.
    `denoise` must be differentiable; `mask` is 1 on known cells. Exact for a single region; on a collage
    of overlapping regions `collage_reconstruction` is the gradient of the merged prediction's error (this
    per-region form stays until the sampler switches over)."""
    x = x.detach().clone().requires_grad_(True)
    residual = (denoise(x) - known) * mask
    loss = residual.pow(2).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return (weight / 2) * grad.detach(), float(loss.detach().sqrt())


def collage_reconstruction(plan: RegionPlan, x: torch.Tensor, denoise_region, x0: torch.Tensor, known: torch.Tensor,
                           mask: torch.Tensor, weight: float, batches: list[tuple[int, ...]] | None = None,
                           moves: list[torch.Tensor] | None = None) -> torch.Tensor:
    """DiffCollage's Reconstruction on the whole collage: (w / 2) grad_x ||mask * (x0(x) - known)||^2, the
    canvas tensor to subtract from the merged prediction x0 (D_eff = x0 - this).

    x: the canvas latent (B, C, H, W) the step denoises; x0: the plan's merged prediction at x (no grad
    needed); known, mask: canvas-shaped or broadcastable (mask 1 on known cells; soft masks weigh the error
    by mask^2, as ||H (x0 - y)||^2 with H = diag(mask)); denoise_region(batch, x_batch): the predictions of the
    regions in `batch` at their gathered latents stacked along dim 0, differentiable in x_batch (called with
    a fresh leaf tensor that requires grad, so run this outside inference mode). `batches`: the regions that
    may share one graph (equal sizes; default one region each). `moves`: per region, the move its latent took
    this step (AnchorSync): region R is denoised at gather_R(x) - moves[R], as x0 was. Regions whose merge weight
    is zero on every cell with an error (no known cell, or coefficient 0) are not called."""
    weights = region_weights(plan, x.dtype, x.device)
    error = 2 * mask * mask * (x0 - known) / normalizer(plan, weights)  # d||H (x0 - y)||^2 / dx0, over N
    gradient = torch.zeros_like(x)
    for batch in batches or [(i,) for i in range(len(plan.regions))]:
        vs = {i: gather(error, plan.regions[i]) * weights[i] for i in batch}
        batch = tuple(i for i in batch if bool(vs[i].any()))
        if not batch:
            continue
        x_batch = torch.cat([gather(x, plan.regions[i]) - (0 if moves is None else moves[i].to(x)) for i in batch])
        x_batch = x_batch.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = denoise_region(batch, x_batch)
        v = torch.cat([vs[i].expand(x.shape[0], *vs[i].shape[1:]) for i in batch])
        (vjp,) = torch.autograd.grad(out, x_batch, grad_outputs=v.to(out.dtype))
        for i, part in zip(batch, vjp.detach().chunk(len(batch))):
            scatter_add(gradient, plan.regions[i], part.to(gradient.dtype))
    return (weight / 2) * gradient


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

