"""ControlSyncSampler: KSampler over a window plan (joint windowed diffusion, per-window ControlNet crops)."""
from __future__ import annotations

import logging

from comfy_api.latest import io

import comfy.samplers
import nodes as comfy_nodes  # ComfyUI's nodes.py

from . import bridge
from .schema import GuideType, SyncType, WindowPlanType, schema


def window_batch_input():
    return io.Int.Input("window_batch_size", default=0, min=0, max=256,
                        tooltip="Windows denoised per model call. 0 = automatic: as many as free memory allows on a "
                                "GPU, one on the CPU. Results are the same as one at a time (up to float rounding).")


def guide_input():
    return GuideType.Input("guide", optional=True,
                           tooltip="Low-pass Guide: keeps the result's downsampling at a low-resolution image (upscaling, "
                                   "super-resolution), jointly over the canvas. Leave empty for none.")


def check_plan_fits(model, plan, latent):
    """Fail at the node, naming the input, before any sampling starts; returns the latent layout."""
    bridge.refuse_unsupported(model.model_options)
    layout = bridge.layout_for(plan, model, latent["samples"].shape)
    mask = latent.get("noise_mask")
    if mask is not None:
        check_mask_fits(tuple(mask.shape[-2:]), layout.canvas, bridge.latent_geometry(model)[0])
    return layout


def check_mask_fits(mask_hw, canvas, factor) -> None:
    """ComfyUI stretches a noise mask to the latent: refuse one that would land a latent cell or more
    away from where it was drawn (a mask made for another canvas)."""
    (mh, mw), (h, w) = mask_hw, canvas
    off = max(abs(mh * w / mw - h), abs(mw * h / mh - w))  # in latent cells
    if off >= 1:
        raise ValueError(f"latent_image: its noise mask is {mw}x{mh} but the canvas is {w * factor}x{h * factor} px "
                         f"({w}x{h} latent cells): the mask would be stretched onto the wrong pixels. Make the mask "
                         f"at the canvas size (e.g. Pad Image for Outpainting on the canvas-sized image).")


class ControlSyncSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ControlSyncSampler",
            display_name="ControlSync Sampler (tiled diffusion, panorama)",
            search_aliases=("panorama", "tiled diffusion", "MultiDiffusion", "SyncDiffusion", "DiffCollage", "ControlNet", "large image", "seamless", "360"),
            category="sampling/controlsync",
            description="KSampler for canvases larger than the model: every step, each window of the plan is "
                        "denoised with its own crop of every ControlNet hint, and the windows are averaged where they "
                        "overlap (MultiDiffusion / ControlSync). Any sampler and scheduler; seeds, denoise, noise masks, "
                        "previews and Cancel behave as in KSampler.",
            inputs=[
                io.Model.Input("model", tooltip="The model, as for KSampler; it is cloned, never modified."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The random seed used for creating the noise (same as KSampler)."),
                io.Int.Input("steps", default=50, min=1, max=10000,
                             tooltip="Denoising steps. 50 as in the ControlSync paper (DDIM, 50 steps)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale; 7.5 as in the papers (diffusers' default)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="ddim",
                               tooltip="Any KSampler sampler (with Anchor Sync all but uni_pc, sa_solver, dpm_fast and "
                                       "dpm_adaptive, which cannot be synced). ddim as in the papers."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="ddim_uniform",
                               tooltip="Any KSampler scheduler. ddim_uniform matches the papers' DDIM timesteps."),
                io.Conditioning.Input("positive", tooltip="Positive prompt, with ControlNets applied to it (whole-canvas hints)."),
                io.Conditioning.Input("negative", tooltip="Negative prompt, with the same ControlNets if applied to it."),
                io.Latent.Input("latent_image", tooltip="The canvas latent; its size must match the plan."),
                WindowPlanType.Input("plan", tooltip="Windows from Window Planner (or a factor graph)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Amount of denoising (below 1 keeps part of the input latent, as in KSampler)."),
                window_batch_input(),
                SyncType.Input("sync", optional=True,
                               tooltip="AnchorSync settings: pulls every window toward the anchor window's look in the "
                                       "first steps (SyncDiffusion / ControlSync). Leave empty for plain joint diffusion."),
                guide_input(),
            ],
            outputs=[io.Latent.Output(tooltip="The denoised canvas latent.")],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, plan,
                denoise=1.0, window_batch_size=0, sync=None, guide=None) -> io.NodeOutput:
        layout = check_plan_fits(model, plan, latent_image)
        factor = bridge.latent_geometry(model)[0]
        bridge.check_guide(guide, plan, (layout.canvas[0] * factor, layout.canvas[1] * factor), factor)
        if sync is not None and len(layout.regions) < 2:
            logging.warning("ControlSync Sampler: the plan has one window, so AnchorSync has nothing to synchronise; "
                            "sampling without it")
            sync = None
        bridge.check_guide_order(guide, plan)
        if getattr(plan, "order", "joint") == "autoregressive":
            if sync is not None:
                logging.warning("ControlSync Sampler: AnchorSync needs the windows sampled together; the "
                                "autoregressive order samples them one after another, so it runs without sync")
            return io.NodeOutput(bridge.sample_autoregressive(model, plan, seed, steps, cfg, sampler_name, scheduler,
                                                              positive, negative, latent_image, denoise))
        # KSampler's denoise samples the last `steps` of an int(steps / denoise)-step schedule
        total = steps if denoise > 0.9999 else int(steps / denoise) if denoise > 0 else None
        windowed = bridge.windowed_model(model, plan, window_batch_size, sync,
                                         schedule_position=None if total is None else (total - steps, total), guide=guide)
        (out,) = comfy_nodes.common_ksampler(windowed, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                             latent_image, denoise=denoise)
        return io.NodeOutput(out)
