"""Conditional generation on a collage: an observation y = H u of the result kept while the rest is
generated (plain torch).

DiffCollage (appendix C.1) conditions a sample on y = H u, H a known linear map - a mask (outpainting,
inpainting: `Masking`) or a low-pass filter (super-resolution: `lowpass.AreaDownsample`) - in two ways:
- Replacement (Algorithm 4, ILVR / DDRM): every step the x0-prediction is projected,
      x0 <- H^+ y + (I - H^+ H) x0 = x0 + H^+ (y - H x0)            (`project`)
  For a mask ComfyUI's noise mask does this (KSamplerX0Inpaint, which also sets x_t on the known cells to
  y noised to the step's level), so the sampler leaves that case to ComfyUI.
- Reconstruction (Algorithm 5): the gradient of ||H x0(x_t) - y||^2 is added to the score. In denoised
  form, as in Video Diffusion Models (Ho et al. 2022, eq. 7) written in ComfyUI's VE coordinates:
      D_eff = D - (w / (2 g)) grad_x ||H D(x) - y||^2,   g = the largest eigenvalue of H H^T
  (the paper's lambda_t = w / (2 g) per step). Where the denoiser's Jacobian is the identity (small sigma)
  the residual becomes (I - H H^T / g)(H D - y): w = 1 is the largest weight that never overshoots, and
  where H H^T = g I - masks (g = 1), area downsampling by an integer ratio k x k (g = 1 / k^2) - it lands
  on y: Replacement is the limit; at large sigma the Jacobian, hence the pull, is small.
  On a collage D is the merged prediction x0(x) = sum_R c_R m_R D_R(x_R) / N (N = sum_R c_R m_R per
  cell), and its gradient is, by the chain rule through the merge,
      grad_x ||H x0 - y||^2 = sum_R scatter_R( J_R^T gather_R(2 H^T (H x0 - y) c_R m_R / N) ),
  one vector-Jacobian product per region whose merge weight touches a cell where H^T (H x0 - y) is not
  zero (`reconstruct`). The older per-region form (`reconstruction_correction`, each region pulled by
  its own residual D_R - y under a mask, then merged) is not this gradient once regions overlap.
Both run jointly over the whole collage (one step for every region), or, for masks, autoregressively:
one window after another, each a full sampling run outpainting from what is known so far (the paper's
baselines).

An observation is any object with `__call__(u)` = H u and `adjoint(v)` = H^T v on canvas-shaped tensors
(B, C, h, w), `gain` (g above), and `pinv(v)` = H^+ v for Replacement; or, for Reconstruction only, one that
gives `normal_residual(x0, y)` itself (H not linear: through a decoder). They are applied without autograd: the sampler calls
them under ComfyUI's inference mode, where tensors they hold could not be saved for a backward pass.
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
    of overlapping regions `reconstruct` is the gradient of the merged prediction's error (this per-region
    form is kept as the comparison the test bed measures against)."""
    x = x.detach().clone().requires_grad_(True)
    residual = (denoise(x) - known) * mask
    loss = residual.pow(2).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return (weight / 2) * grad.detach(), float(loss.detach().sqrt())


class Masking:
    """H = diag(mask): the known-pixels observation (mask 1 on known cells; a soft mask weighs the error by
    mask^2). y = mask * known."""
    gain = 1.0  # H H^T = diag(mask^2): 1 for a binary mask (a soft mask keeps the same w)

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        return self.mask * u

    adjoint = __call__

    def pinv(self, v: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask != 0, v / torch.where(self.mask != 0, self.mask, 1), 0)


def project(observation, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Replacement's projection H^+ y + (I - H^+ H) x0, as x0 + H^+ (y - H x0)."""
    return x0 + observation.pinv(y - observation(x0))


def normal_residual(observation, x0: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(H^T (H x0 - y), g): half the gradient of ||H x0 - y||^2 in x0, and the gain Reconstruction divides its
    weight by. An observation that is not linear in x0 (a low-pass through a decoder) gives its own
    `normal_residual(x0, y)`: its Jacobian's transpose at x0, and its gain there."""
    own = getattr(observation, "normal_residual", None)
    if own is not None:
        return own(x0, y)
    return observation.adjoint(observation(x0) - y), observation.gain


def collage_gradient(plan: RegionPlan, x: torch.Tensor, denoise_region, residual: torch.Tensor,
                     batches: list[tuple[int, ...]] | None = None,
                     moves: list[torch.Tensor] | None = None) -> torch.Tensor:
    """J^T residual, J the Jacobian of the plan's merged prediction x0(x) at the canvas latent x (module doc):
    sum_R scatter_R( J_R^T gather_R(residual c_R m_R / N) ).

    denoise_region(batch, x_batch): the predictions of the regions in `batch` at their gathered latents
    stacked along dim 0, differentiable in x_batch (called with a fresh leaf tensor that requires grad, so
    run this outside inference mode). `batches`: the regions that may share one graph (equal sizes; default
    one region each). `moves`: per region, the move its latent took this step (AnchorSync): region R is
    denoised at gather_R(x) - moves[R], as x0 was. Regions whose merge weight is zero on every cell where
    the residual is not (no observed cell, or coefficient 0) are not called."""
    weights = region_weights(plan, x.dtype, x.device)
    error = residual / normalizer(plan, weights)
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
    return gradient


def reconstruct(plan: RegionPlan, x: torch.Tensor, denoise_region, x0: torch.Tensor, observation, y: torch.Tensor,
                weight: float, batches: list[tuple[int, ...]] | None = None,
                moves: list[torch.Tensor] | None = None) -> torch.Tensor:
    """DiffCollage's Reconstruction on the whole collage: (w / (2 g)) grad_x ||H x0(x) - y||^2 (g: the
    observation's gain, module doc), the canvas tensor to subtract from the merged prediction x0 (D_eff = x0 - this):
    (w / g) J^T H^T (H x0 - y). x: the canvas latent (B, C, H, W) the step denoises; x0: the plan's merged
    prediction at x (no grad needed); observation: H (module doc), y: the observation, shaped like H x0 or
    broadcastable to it; the rest as `collage_gradient`."""
    residual, gain = normal_residual(observation, x0, y)
    return (weight / gain) * collage_gradient(plan, x, denoise_region, residual, batches, moves)


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

