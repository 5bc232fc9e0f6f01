"""DiffCollage's Reconstruction guidance on the whole collage, through the guider's math and the model."""
from __future__ import annotations

from dataclasses import replace

from ...sampling import gather, rect_region
from ...sampling.conditional import collage_reconstruction
from .autograd import adds_in_place, control_modules, differentiable, gradient_options
from .memory import halving_batches
from .model_patches import patch_modules
from .passes import batches_of, guided_x0


def reconstruction_correction(run, model, conds, x_in, timestep, model_options, sync=None):
    """(w / 2) grad_x ||H x0(x) - y||^2, x0 the merged collage prediction through the guider's math (replayed on
    the outputs this evaluation merged, at the regions' AnchorSync-moved latents when the step is synced: a
    real x0), one region batch's graph at a time (sampling/conditional.py's collage_reconstruction)."""
    plan = run.ctx.plan
    if run.ctx.config.focus is not None:  # the latent is the one region itself: its geometry is the latent's
        plan = replace(plan, canvas=tuple(x_in.shape[-2:]), regions=(rect_region(0, 0, *x_in.shape[-2:]),))
    known, mask = (t.to(x_in.device, x_in.dtype) for t in run.known)
    x0 = run.ctx.guider(x_in, timestep, model_options=model_options, seed=run.ctx.seed)
    touching = [i for i, c in enumerate(plan.coefficients) if c != 0 and bool(gather(mask, plan.regions[i]).any())]
    moves = _latent_moves(plan, sync)
    total = []
    with differentiable([model.diffusion_model] + control_modules(conds) + patch_modules(model_options),
                        copy_saved=adds_in_place(model)):
        options = gradient_options(model_options)

        def one_batch(batch):
            # a clone of the latent: what autograd runs on must not be an inference tensor
            total.append(collage_reconstruction(plan, x_in.clone(), lambda b, x: guided_x0(run, b, x, timestep, options),
                                                x0, known, mask, run.ctx.config.reconstruction, [batch], moves))
        halving_batches(batches_of(plan, touching, run.gradient_batch_size(model, conds, x_in)), one_batch,
                        lambda size: setattr(run, "gradient_batch", size), "reconstruction",
                        "Set Factor Graph Collage's known_pixels to replacement, or plan smaller windows.")
    return sum(total) if total else None


def _latent_moves(plan, sync):
    """Each region's latent move this step: AnchorSync's exact moves; in the fast mode, whose regions are
    evaluated unmoved and their predictions shifted, none."""
    return None if sync is None or sync.moves is None else sync.moves
