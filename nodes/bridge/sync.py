"""AnchorSync's gradient passes: every factor's step toward the anchor factor, through the guider's own math
(sampling/sync.py has the algorithm; this module runs it on ComfyUI's guider, model and decoder)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.utils

from ...sampling import gather
from ...sampling.sync import (factor_indices, jacobian_slope, kappa_bound, lpips_input, region_moves, sync_deltas,
                              window_sync_gradient)
from .autograd import adds_in_place, control_modules, differentiable, gradient_options
from .loss_models import loss_path
from .memory import halving_batches
from .model_patches import patch_modules
from .passes import batches_of, guided_x0

_OUT_OF_MEMORY_ADVICE = ("Set Anchor Sync's loss_resolution to half, its loss_decoder to taesd or its gradient to "
                         "'skip model Jacobian', or plan smaller windows.")


@dataclass(frozen=True)
class SyncMoves:
    """One synced evaluation's moves, per region: `moves`, the latent move each region is denoised at (exact
    mode), or `shifts`, the change of each region's prediction the move makes (fast mode: regions are
    denoised at their unmoved latents and shifted); `canvas`, the merged move the sampler's x takes."""
    moves: list | None
    shifts: list | None
    canvas: torch.Tensor


def sync_moves(run, model, conds, x_in, timestep, model_options, sync) -> SyncMoves:
    """AnchorSync for this evaluation: every factor's gradient step toward the anchor factor and every
    region's resulting move. Exact mode: the gradient runs through the guider, the ControlNets and the model.
    Fast mode: it stops at the x0-prediction, and the model's slope along it comes from one forward
    difference (sampling/sync.py)."""
    weight, sigma = sync
    plan, fast = run.ctx.plan, not run.ctx.config.sync.through_model
    factors = factor_indices(plan)
    latents = {i: gather(x_in, plan.regions[i]) for i in factors}
    others = [i for i in factors if i != plan.anchor]
    decode, modules, loss, loss_bytes = loss_path(run.ctx.config.sync, model, x_in)
    batches = batches_of(plan, others, run.gradient_batch_size(model, conds, x_in, loss_bytes))
    if not fast:
        modules = modules + [model.diffusion_model] + control_modules(conds) + patch_modules(model_options)
    # the anchor's x0, recorded: the denoising pass reuses it
    anchor_x0 = guided_x0(run, (plan.anchor,), latents[plan.anchor], timestep, model_options, record=True)
    bar = comfy.utils.ProgressBar(len(others))
    x0s = {}
    with differentiable(modules, copy_saved=adds_in_place(model)):
        anchor_image = lpips_input(decode(anchor_x0.clone())).detach()
        grad_options = gradient_options(model_options)

        def gradient(batch, x):
            comfy.model_management.throw_exception_if_processing_interrupted()
            anchor = anchor_image.repeat(len(batch), *([1] * (anchor_image.ndim - 1)))
            if fast:  # g = grad_{x0} L at the sampler's own x0 (recorded: the denoising pass reuses it)
                with torch.no_grad():
                    x0 = guided_x0(run, batch, x, timestep, model_options, record=True)
                values, g = window_sync_gradient(x0.clone(), lambda v: v, decode, loss, anchor)
                x0s[batch] = x0
                out = values, g.to(x.dtype)
            else:
                out = window_sync_gradient(x, lambda v: guided_x0(run, batch, v, timestep, grad_options), decode, loss,
                                           anchor)
            bar.update(len(batch))
            return out

        deltas, skipped = {}, []

        def one_batch(batch):
            found, lost = sync_deltas({i: latents[i].clone() for i in batch}, [batch], weight, sigma, gradient,
                                      run.ctx.parameterisation)
            deltas.update(found)
            skipped.extend(lost)
        halving_batches(batches, one_batch, lambda size: setattr(run, "gradient_batch", size), "sync",
                        _OUT_OF_MEMORY_ADVICE)
    if skipped:
        logging.warning(f"ControlSync AnchorSync: non-finite sync loss or gradient at sigma {sigma:.4g} for "
                        f"window(s) {sorted(skipped)}; they skip this sync step")
    deltas = {i: d.detach() for i, d in deltas.items()}
    if fast:
        # the batches that ran (an out-of-memory retry may have split some)
        deltas, shifts = _fast_moves(run, list(x0s), latents, x0s, deltas, timestep, model_options, sigma)
        shifts[plan.anchor] = torch.zeros_like(latents[plan.anchor])
    deltas[plan.anchor] = torch.zeros_like(latents[plan.anchor])
    moves = region_moves(plan, deltas)
    canvas = _merged(run, moves, x_in)
    if fast:
        return SyncMoves(None, region_moves(plan, shifts), canvas)
    return SyncMoves(moves, None, canvas)


def _fast_moves(run, batches, latents, x0s, unit_moves, timestep, model_options, sigma):
    """(moves, prediction shifts) of the fast mode's factors: u = w c^2 g is the move at slope 1; one forward
    evaluation at x - u gives the slope kappa along u, the move kappa u and the shift kappa (D(x) - D(x - u))."""
    bound = kappa_bound(run.ctx.parameterisation, sigma)
    moves, shifts = {}, {}
    for batch in batches:
        u = torch.cat([unit_moves[i] for i in batch])
        if not bool(u.any()):
            kappa, difference = u.new_zeros((u.shape[0],) + (1,) * (u.ndim - 1)), torch.zeros_like(u)
        else:
            with torch.no_grad():
                probe = guided_x0(run, batch, torch.cat([latents[i] for i in batch]) - u, timestep, model_options,
                                  reuse=False)
            difference = x0s[batch].to(u) - probe.to(u)
            kappa = jacobian_slope(x0s[batch].to(u), probe.to(u), u, bound)
        for i, k, du, dd in zip(batch, kappa.chunk(len(batch)), u.chunk(len(batch)), difference.chunk(len(batch))):
            moves[i], shifts[i] = k * du, k * dd
    return moves, shifts


def _merged(run, per_region, like):
    merger = run.ctx.merge.merger(like)
    for i, t in enumerate(per_region):
        merger.add(i, t.to(like))
    return merger.result()
