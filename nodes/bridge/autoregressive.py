"""The DiffCollage paper's autoregressive baseline: one window after another, each a full KSampler run."""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.sample
import comfy.sampler_helpers
import comfy.utils
import latent_preview

from ...sampling import gather, scatter_set
from ...sampling.conditional import autoregressive_order
from .model_facts import layout_for
from .windowed import windowed_model


def sample_autoregressive(model, plan, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                          denoise=1.0):
    """The autoregressive baseline: one window after another, each a full KSampler run of its own that
    outpaints from the cells known so far (the user's noise mask, then the windows done), kept by
    Replacement (ComfyUI's noise mask) or Reconstruction as the plan says. Same canvas noise as a joint run.
    One progress bar runs over all windows, previewing the whole canvas."""
    samples = latent["samples"]
    layout = layout_for(plan, model, samples.shape)
    canvas = comfy.sample.fix_empty_latent_channels(model, samples).clone()
    noise = comfy.sample.prepare_noise(canvas, seed, latent.get("batch_index"))
    mask = latent.get("noise_mask")
    known = torch.zeros(canvas.shape[-2:], dtype=torch.bool)
    if mask is not None:
        mask = comfy.sampler_helpers.prepare_mask(mask, canvas.shape, "cpu")
        known = (mask < 0.5).all(dim=0).all(dim=0)
    order = [i for i in autoregressive_order(layout, known)]
    todo = [i for i in order if not bool(gather(known, layout.regions[i]).all())]
    progress = _CanvasProgress(model, canvas, len(todo) * steps)
    for done, i in enumerate(todo):
        comfy.model_management.throw_exception_if_processing_interrupted()
        region = layout.regions[i]
        window_mask = (~gather(known, region)).to(canvas.dtype).expand(canvas.shape[0], 1, *region.size)
        windowed = windowed_model(model, plan, 1, focus=(tuple(canvas.shape), i))
        out = comfy.sample.sample(windowed, gather(noise, region), steps, cfg, sampler_name, scheduler, positive,
                                  negative, gather(canvas, region).contiguous(), denoise=denoise,
                                  noise_mask=window_mask if bool((window_mask < 1).any()) else None, seed=seed,
                                  callback=progress.callback(region, done * steps),
                                  disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED)
        scatter_set(canvas, region, out.to(canvas.dtype))
        scatter_set(known, region, torch.ones(region.size, dtype=torch.bool))
    out = latent.copy()
    out.pop("noise_mask", None)  # already applied: every window kept the known cells
    out["samples"] = canvas
    return out


class _CanvasProgress:
    """One ComfyUI progress bar over every window's steps, previewing the canvas with the current
    window's x0-prediction pasted in."""

    def __init__(self, model, canvas, total):
        self.canvas = canvas
        self.bar = comfy.utils.ProgressBar(max(total, 1))
        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)

    def callback(self, region, offset):
        def update(step, x0, x, total_steps):
            preview = None
            if self.previewer:
                shown = self.canvas[:1].clone()
                scatter_set(shown, region, x0[:1].to(shown))
                preview = self.previewer.decode_latent_to_preview_image("JPEG", shown)
            self.bar.update_absolute(offset + step + 1, preview=preview)
        return update


