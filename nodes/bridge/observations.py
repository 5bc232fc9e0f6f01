"""Conditioning observations y = H(result) on the whole canvas (DiffCollage, appendix C.1), through the guider's
math and the model: the known cells of a noise mask when a factor graph keeps them by Reconstruction, and the
Low-pass Guide's low-resolution image (super-resolution: H = area downsampling onto its grid, in latent space or
after the decoder). Each is kept by Replacement (the merged x0-prediction projected, Algorithm 4) or Reconstruction
(a gradient step on ||H x0 - y||^2, Algorithm 5); several at once add their corrections (sampling/conditional.py
has the algorithms)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

import comfy.model_management
import comfy.sampler_helpers
import comfy.utils

from ...sampling import gather, rect_region
from ...sampling.conditional import Masking, collage_gradient, normal_residual, project
from ...sampling.lowpass import AreaDownsample
from .loss_models import decode_latent, load_vae
from .autograd import adds_in_place, autograd_copy, control_modules, differentiable, gradient_options
from .memory import halving_batches
from .model_facts import latent_geometry
from .model_patches import patch_modules
from .passes import batches_of, guided_x0


@dataclass(frozen=True, eq=False)
class Observation:
    operator: object          # H (sampling/conditional.py's interface)
    y: torch.Tensor           # the observation, shaped like H(x0) or broadcastable to it
    method: str               # "replacement" | "reconstruction"
    weight: float = 1.0       # Reconstruction's w


def check_guide_order(guide, plan) -> None:
    """Refuse a Low-pass Guide on a plan sampled window after window."""
    if guide is not None and getattr(plan, "order", "joint") == "autoregressive":
        raise ValueError("guide: the Low-pass Guide constrains the whole canvas at every step; the autoregressive "
                         "order samples one window after another. Set Factor Graph Collage's order to joint, or "
                         "disconnect the guide")


def check_guide(guide, plan, canvas_px: tuple[int, int], factor: int) -> None:
    """Refuse, naming the input, a Low-pass Guide that cannot constrain this canvas (`factor`: pixels per latent
    cell)."""
    if guide is None:
        return
    h, w = (int(v) for v in guide.image.shape[1:3])
    H, W = canvas_px
    if h > H or w > W:
        raise ValueError(f"guide: the low-resolution image is {w}x{h} px, larger than the canvas ({W}x{H} px); the "
                         f"guide keeps the result's downsampling at it, so it must be at most the canvas size (give "
                         f"the image before upscaling)")
    if getattr(plan, "graph", None) == "cubemap" and guide.space == "pixels":
        raise ValueError("guide: space 'pixels' decodes the canvas tile by tile as one image, and a cubemap's strip "
                         "is six faces whose borders do not continue each other there (the cube padding of Loop VAE "
                         "Decode is not applied); use space 'latent' on a cubemap")
    if getattr(plan, "graph", None) == "cubemap" and w != 6 * h:
        raise ValueError(f"guide: a cubemap's canvas is a strip of six square faces; the low-resolution image must be "
                         f"one too (6 times as wide as high, faces in the canvas's order), got {w}x{h} px")
    # ComfyUI-style stretching of y onto the canvas: refuse one that lands a latent cell or more off
    off = max(abs(h * W / w - H), abs(w * H / h - W)) / factor
    if off >= 1:
        raise ValueError(f"guide: the low-resolution image ({w}x{h} px) does not have the canvas's aspect ({W}x{H} "
                         f"px): stretched onto it, it would land a latent cell or more off. Scale or crop it to the "
                         f"canvas's aspect (the image the canvas was upscaled from has it)")


def build(config, patcher, latent_shape, latent_image, denoise_mask):
    """(observations, the noise mask left for ComfyUI) at the start of a run: the noise mask's known cells when
    the plan keeps them by Reconstruction (sampled then without the mask), and the Low-pass Guide's y."""
    observed = []
    if config.reconstruction is not None and denoise_mask is not None:
        mask = comfy.sampler_helpers.prepare_mask(denoise_mask, latent_shape, latent_image.device)
        known = 1.0 - mask
        observed.append(Observation(Masking(known), known * patcher.model.process_latent_in(latent_image),
                                    "reconstruction", config.reconstruction))
        denoise_mask = None
    if config.guide is not None:
        factor = latent_geometry(patcher)[0]
        check_guide(config.guide, config.plan, (latent_shape[-2] * factor, latent_shape[-1] * factor), factor)
        guide = config.guide
        space = latent_guide if guide.space == "latent" else pixel_guide
        operator, y = space(guide, patcher, latent_shape, factor, getattr(config.plan, "graph", None) == "cubemap")
        observed.append(Observation(operator, y, guide.method, float(guide.weight)))
    return tuple(observed), denoise_mask


def latent_guide(guide, patcher, latent_shape, factor, cubemap):
    """H: the canvas latent area-downsampled onto y's latent grid; y: the same H of the latent of y stretched
    onto the canvas (bicubic) and encoded tile by tile, as the sampled latent (the model's latent space)."""
    h, w = latent_shape[-2:]
    y_h, y_w = guide.image.shape[1:3]
    t_h = min(h, max(1, round(y_h / factor)))
    target = (t_h, 6 * t_h) if cubemap else (t_h, min(w, max(1, round(y_w / factor))))
    pixels = comfy.utils.common_upscale(guide.image[..., :3].movedim(-1, 1), w * factor, h * factor, "bicubic",
                                        "disabled").clamp(0, 1).movedim(1, -1)
    z = patcher.model.process_latent_in(guide.vae.encode_tiled(pixels))
    if tuple(z.shape[-2:]) != (h, w) or z.shape[1] != latent_shape[1]:
        raise ValueError(f"guide: its VAE encodes the canvas to a latent of shape {tuple(z.shape[1:])}, but the model "
                         f"samples {tuple(latent_shape[1:])}; connect the model's own VAE")
    operator = AreaDownsample((h, w), target)
    return operator, operator(z)


def pixel_guide(guide, patcher, latent_shape, factor, cubemap):
    """H: the x0-prediction decoded tile by tile, area-downsampled onto y's pixel grid; y: the image ([-1, 1])."""
    image = guide.image[..., :3].movedim(-1, 1)
    y = image.to(torch.promote_types(image.dtype, torch.float32)) * 2 - 1
    return DecodedLowPass(guide.vae, patcher.model.latent_format, (latent_shape[-2] * factor, latent_shape[-1] * factor),
                          tuple(y.shape[-2:])), y


class DecodedLowPass:
    """H(x0) = A(decode(x0)), A area downsampling of the decoded canvas onto y's pixel grid. The decoder runs on
    latent tiles of `tile` cells with `margin` cells of context each side (each tile's core is kept), so the
    decoder's working memory does not grow with the canvas. Not linear: Reconstruction only, so it gives only its
    normal residual (sampling/conditional.py's interface for observations that are not linear), which is J^T A^T (A decode(x0) - y), J
    the tiled decoder's Jacobian at x0 (one backward pass per tile), and its gain the Rayleigh quotient of H^T H
    along that residual e, ||A J e||^2 / ||e||^2 (J e by central differences): for a linear H with H H^T = g I
    this is g, the paper's gain; otherwise w 1 is the step that minimises the linearised error along e. Per step:
    four decodes of the canvas, tile by tile: H x0, the one the backward pass runs through, and A J e's two sides."""

    def __init__(self, vae, latent_format, canvas_px, target, tile=32, margin=8):
        self.vae, self.tile, self.margin = vae, tile, margin
        with torch.inference_mode(False):
            self.latent_format = autograd_copy(latent_format)
        self.area = AreaDownsample(canvas_px, target)

    def _tiles(self, shape):
        h, w = shape[-2:]
        for top in range(0, h, self.tile):
            for left in range(0, w, self.tile):
                window = (max(0, top - self.margin), min(h, top + self.tile + self.margin),
                          max(0, left - self.margin), min(w, left + self.tile + self.margin))
                core = (top, min(h, top + self.tile), left, min(w, left + self.tile))
                yield window, core

    def _tile_images(self, x0, with_grad_of=None):
        """The canvas decoded tile by tile (each tile's core kept); with `with_grad_of` (a tensor shaped like that
        image), instead the latent gradient sum over tiles of J_tile^T with_grad_of[core]."""
        work = torch.promote_types(x0.dtype, torch.float32)  # float32 at least (half-precision latents)
        out = torch.zeros_like(x0, dtype=work) if with_grad_of is not None else None
        for (y0, y1, x0_, x1), (cy0, cy1, cx0, cx1) in self._tiles(x0.shape):
            comfy.model_management.throw_exception_if_processing_interrupted()
            z = x0[..., y0:y1, x0_:x1].to(work)
            if with_grad_of is not None:
                z = z.detach().clone().requires_grad_(True)
            image = decode_latent(self.vae, self.latent_format, z, work)
            k = image.shape[-1] // (x1 - x0_)  # pixels per latent cell
            core = image[..., (cy0 - y0) * k:(cy1 - y0) * k, (cx0 - x0_) * k:(cx1 - x0_) * k]
            if with_grad_of is None:
                if out is None:
                    out = image.new_zeros(*image.shape[:-2], x0.shape[-2] * k, x0.shape[-1] * k)
                out[..., cy0 * k:cy1 * k, cx0 * k:cx1 * k] = core
            else:
                v = with_grad_of[..., cy0 * k:cy1 * k, cx0 * k:cx1 * k].to(core)
                (g,) = torch.autograd.grad(core, z, grad_outputs=v)
                out[..., y0:y1, x0_:x1] += g.to(out.device)
        return out

    def normal_residual(self, x0, y):
        load_vae(self.vae)
        with torch.no_grad():
            low = self.area(self._tile_images(x0))
        back = self.area.adjoint(low - y.to(low))
        with differentiable([self.vae.first_stage_model]):
            e = self._tile_images(x0, with_grad_of=back)
        norm = float(e.norm())
        if norm == 0.0:
            return e.to(x0), 1.0
        eps = 1e-3 * max(float(x0.norm()), 1.0) / norm
        with torch.no_grad():  # A J e by central differences
            step = (eps * e).to(x0)
            slope = (self.area(self._tile_images(x0 + step)) - self.area(self._tile_images(x0 - step))) / (2 * eps)
        gain = float(slope.pow(2).sum()) / norm ** 2
        return e.to(x0), max(gain, 1e-12)


def correction(run, model, conds, x_in, timestep, model_options, sync=None):
    """What to subtract from every cond's merged prediction so that the guider's x0 becomes the corrected one:
    Replacement's x0 - proj(x0) and Reconstruction's (w / g) J^T H^T (H x0 - y), summed over the observations, at
    the guider's x0 (replayed on the outputs this evaluation merged, at the regions' AnchorSync-moved latents when
    the step is synced: a real x0). None when nothing is to be corrected."""
    x0 = run.ctx.guider(x_in, timestep, model_options=model_options, seed=run.ctx.seed)
    total, residual = None, None
    for observation in run.observations:
        y = observation.y.to(x0.device)
        if observation.method == "replacement":
            part = x0 - project(observation.operator, x0, y.to(x0.dtype))
            total = part if total is None else total + part
        else:
            r, gain = normal_residual(observation.operator, x0, y.to(x0.dtype))
            r = r * (observation.weight / gain)
            residual = r if residual is None else residual + r
    if residual is not None and bool(residual.any()):
        gradient = _collage_gradient(run, model, conds, x_in, timestep, model_options, residual, sync)
        if gradient is not None:
            total = gradient if total is None else total + gradient
    return total


def _collage_gradient(run, model, conds, x_in, timestep, model_options, residual, sync):
    """J^T residual through the merged prediction, the guider's math and the model, one region batch's graph at a
    time (sampling/conditional.py's collage_gradient)."""
    plan = run.ctx.plan
    if run.ctx.config.focus is not None:  # the latent is the one region itself: its geometry is the latent's
        plan = replace(plan, canvas=tuple(x_in.shape[-2:]), regions=(rect_region(0, 0, *x_in.shape[-2:]),))
    touching = [i for i, c in enumerate(plan.coefficients) if c != 0 and bool(gather(residual, plan.regions[i]).any())]
    moves = None if sync is None else sync.moves  # the fast mode's regions are evaluated unmoved and shifted
    total = []
    with differentiable([model.diffusion_model] + control_modules(conds) + patch_modules(model_options),
                        copy_saved=adds_in_place(model)):
        options = gradient_options(model_options)

        def one_batch(batch):
            # a clone of the latent: what autograd runs on must not be an inference tensor
            total.append(collage_gradient(plan, x_in.clone(), lambda b, x: guided_x0(run, b, x, timestep, options),
                                          residual, [batch], moves))
        halving_batches(batches_of(plan, touching, run.gradient_batch_size(model, conds, x_in)), one_batch,
                        lambda size: setattr(run, "gradient_batch", size), "reconstruction",
                        "Set Factor Graph Collage's known_pixels or the Low-pass Guide's method to replacement, or "
                        "plan smaller windows.")
    return sum(total) if total else None
