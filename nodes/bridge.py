"""The one module that talks to ComfyUI internals.

Windowed sampling is a CALC_COND_BATCH wrapper on a clone of the user's model: it sits below
CFG, sees the conds before any ControlNet ran, and calls ComfyUI's own cond batching once per
batch of windows with window-cropped latents, masks, spatial model conds and real `ControlBase`
copies whose hints are window crops of the canvas-sized hint. Nothing is patched globally and
nothing mutable is stored in `model_options`: per-run state lives in a context variable set by
an OUTER_SAMPLE wrapper.
"""
from __future__ import annotations

import contextlib
import copy
import contextvars
import functools
import logging
import math
import os
from dataclasses import dataclass, replace

import torch

import comfy.conds
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.patcher_extension
import comfy.sample
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview

from ..sampling import Merger, PlanError, gather, scatter_set
from ..sampling.conditional import autoregressive_order, reconstruction_correction
from ..sampling.conditioning import crop_origins, window_size_conditioning
from ..sampling.perceptual import build_lpips, find_backbone, hub_checkpoints
from ..sampling.sync import SyncSchedule, fold_update, lpips_input, step_index, sync_deltas, window_sync_gradient

WRAPPER_KEY = "controlsync.windows"
# pre-run state that ControlBase.copy() does not carry over (set by pre_run on the originals)
_CONTROL_RUN_STATE = ("timestep_range", "model_sampling_current", "control_model", "manual_cast_dtype")
_run_state: contextvars.ContextVar["_Run | None"] = contextvars.ContextVar("controlsync_run", default=None)


@dataclass(frozen=True)
class SyncSettings:
    """What AnchorSync asks for (the SYNC socket type)."""
    schedule: SyncSchedule
    vae: object              # comfy.sd.VAE: the decoder the loss looks through
    loss_net: str = "vgg"    # LPIPS backbone
    through_model: bool = True  # False: skip the denoiser's Jacobian (fast mode)
    loss_downscale: int = 1     # 2: the loss looks at x0 decoded at half size (4x cheaper decoder and LPIPS)
    loss_decoder: str = "vae"   # "taesd": ComfyUI's tiny differentiable decoder (models/vae_approx) instead


@dataclass(frozen=True)
class WindowedConfig:
    """Immutable: safe to share between model clones."""
    plan: object          # anything with .layout(latent_hw, factor, multiple) -> RegionPlan
    window_batch: int     # windows per model call; 0 = as many as memory allows
    sync: SyncSettings | None = None
    focus: tuple | None = None   # (canvas latent shape, region index): sample only that region's latent

    @property
    def reconstruction(self) -> float | None:
        """The Reconstruction weight when the plan keeps known pixels that way, else None (Replacement:
        ComfyUI's noise mask)."""
        if getattr(self.plan, "known_pixels", "replacement") != "reconstruction":
            return None
        return float(self.plan.reconstruction_weight)


def latent_geometry(model) -> tuple[int, int]:
    """(pixels per latent cell, latent cells a window side must be a multiple of) for a ModelPatcher
    or BaseModel, read from the model instead of assuming SD's 8x VAE."""
    base = getattr(model, "model", model)
    factor = getattr(base.latent_format, "spacial_downscale_ratio", 8)
    patch = getattr(base.diffusion_model, "patch_size", 1)
    return int(factor), int(patch) if isinstance(patch, int) and patch > 0 else 1


def parameterisation(model) -> str:
    """The space the model samples in, read from its model_sampling (after any ModelSampling* node's patch):
    "ve" (eps, v-prediction, x0, EDM: x = x0 + sigma eps) or "flow" (CONST: x = (1 - sigma) x0 + sigma eps);
    see sampling/sync.py. A ModelPatcher or a BaseModel."""
    sampling = model.get_model_object("model_sampling") if hasattr(model, "get_model_object") else model.model_sampling
    kinds = ((comfy.model_sampling.CONST, "flow"), (comfy.model_sampling.EPS, "ve"))
    for cls, name in kinds:
        # the sampler's space is set by noise_scaling: a subclass that redefines it is another space
        if isinstance(sampling, cls) and type(sampling).noise_scaling is cls.noise_scaling:
            return name
    names = [c.__name__ for c in type(sampling).__mro__ if c.__module__ == comfy.model_sampling.__name__] or [type(sampling).__name__]
    raise ValueError(f"sync: AnchorSync steps in the model's own parameterisation and knows eps / v-prediction "
                     f"(x = x0 + sigma eps) and flow matching (CONST: x = (1 - sigma) x0 + sigma eps); this MODEL "
                     f"samples with {' + '.join(names)}. Sample it without AnchorSync (leave sync empty).")


def layout_for(plan, model, latent_shape):
    """The plan laid out on a latent of `latent_shape` for this model (a ModelPatcher or BaseModel)."""
    # 2-D images; models with video latents (Qwen-Image: Wan's VAE) take an image as one frame (B, C, 1, H, W)
    if not (len(latent_shape) == 4 or (len(latent_shape) == 5 and latent_shape[2] == 1)):
        raise ValueError(f"latent_image: ControlSync plans are 2-D images; got a latent of shape {tuple(latent_shape)} "
                         f"({len(latent_shape) - 2} spatial dims)")
    factor, multiple = latent_geometry(model)
    try:
        return plan.layout(tuple(latent_shape[-2:]), factor, multiple)
    except PlanError as e:
        raise ValueError(f"plan / latent_image: {e}") from None


def refuse_unsupported(model_options: dict) -> None:
    if model_options.get("context_handler") is not None:
        raise ValueError("model: ComfyUI's context windows are active on this MODEL (a context-window node is "
                         "upstream); they do not crop ControlNet hints and cannot be combined with ControlSync "
                         "windows. Remove the context-window node, or sample without ControlSync.")
    if "multigpu_clones" in model_options:
        raise ValueError("model: this MODEL is set up for ComfyUI's multi-GPU sampling; ControlSync windows need "
                         "one device. Remove the multi-GPU node for this sampler.")


def windowed_model(model, plan, window_batch: int = 0, sync: SyncSettings | None = None, focus=None):
    """A clone of `model` whose sampling runs the plan's windows; `model` itself is untouched."""
    refuse_unsupported(model.model_options)
    if sync is not None:
        parameterisation(model)  # refuse an unknown parameterisation before sampling starts
    if model.get_wrappers(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY):
        raise ValueError("model: this MODEL already carries a ControlSync window plan (from ControlSync Windowed "
                         "Model); connect the original MODEL instead of windowing it twice.")
    config = WindowedConfig(plan, int(window_batch), sync, focus)
    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY,
                               functools.partial(_outer_sample, config))
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY,
                               functools.partial(_calc_cond_batch, config))
    return clone


def sample_autoregressive(model, plan, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                          denoise=1.0):
    """The autoregressive baseline: one window after another, each a full KSampler run of its own that
    outpaints from the cells known so far (the user's noise mask, then the windows done), kept by
    Replacement (ComfyUI's noise mask) or Reconstruction as the plan says. Same canvas noise as a joint run."""
    samples = latent["samples"]
    layout = layout_for(plan, model, samples.shape)
    canvas = comfy.sample.fix_empty_latent_channels(model, samples).clone()
    noise = comfy.sample.prepare_noise(canvas, seed, latent.get("batch_index"))
    mask = latent.get("noise_mask")
    known = torch.zeros(canvas.shape[-2:], dtype=torch.bool)
    if mask is not None:
        mask = comfy.sampler_helpers.prepare_mask(mask, canvas.shape, "cpu")
        known = (mask < 0.5).all(dim=0).all(dim=0)
    for i in autoregressive_order(layout, known):
        comfy.model_management.throw_exception_if_processing_interrupted()
        region = layout.regions[i]
        window_known = gather(known, region)
        if bool(window_known.all()):
            continue  # nothing left to generate in this window
        window_mask = (~window_known).to(canvas.dtype).expand(canvas.shape[0], 1, *region.size)
        windowed = windowed_model(model, plan, 1, focus=(tuple(canvas.shape), i))
        out = comfy.sample.sample(windowed, gather(noise, region), steps, cfg, sampler_name, scheduler, positive,
                                  negative, gather(canvas, region).contiguous(), denoise=denoise,
                                  noise_mask=window_mask if bool((window_mask < 1).any()) else None, seed=seed,
                                  callback=latent_preview.prepare_callback(windowed, steps),
                                  disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED)
        scatter_set(canvas, region, out.to(canvas.dtype))
        scatter_set(known, region, torch.ones(region.size, dtype=torch.bool))
    out = latent.copy()
    out.pop("noise_mask", None)  # already applied: every window kept the known cells
    out["samples"] = canvas
    return out


def _outer_sample(config, executor, noise, latent_image, sampler, sigmas, denoise_mask=None, *args, **kwargs):
    run = _Run(config)
    run.cfg = getattr(executor.class_obj, "cfg", None)
    if config.reconstruction is not None and denoise_mask is not None:
        # Reconstruction instead of ComfyUI's Replacement: keep the mask (1 = to generate) for the
        # guidance and sample without it
        base = executor.class_obj.model_patcher.model
        mask = comfy.sampler_helpers.prepare_mask(denoise_mask, noise.shape, noise.device)
        run.known = (base.process_latent_in(latent_image.to(noise.device)), 1.0 - mask)
        denoise_mask = None
    token = _run_state.set(run)
    try:
        return executor(noise, latent_image, sampler, sigmas, denoise_mask, *args, **kwargs)
    except BaseException:
        # ComfyUI resets the user's ControlNets (pre-run state, cached hints) only after a successful
        # run; on errors and Cancel we do it too, so they are left exactly as before the run.
        _cleanup_controls(getattr(executor.class_obj, "conds", None))
        raise
    finally:
        _run_state.reset(token)
        run.close()


def _cleanup_controls(conds) -> None:
    seen = set()
    for cond_list in (conds or {}).values():
        for d in cond_list:
            control = d.get("control")
            if control is not None and id(control) not in seen:
                seen.add(id(control))
                control.cleanup()


def _calc_cond_batch(config, executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
    refuse_unsupported(model_options)
    run = _run_state.get()
    transient = run is None or run.config is not config
    if transient:  # called outside our OUTER_SAMPLE (another guider's path): state for this call only
        run = _Run(config)
    try:
        plan = run.layout(model, x_in)
        synced = run.sync_step(model_options, timestep, plan)
        deltas = None
        if synced is not None:
            weight, sigma, r = synced
            deltas = run.sync_deltas(executor, model, conds, x_in, timestep, model_options, weight, sigma)
        corrections = {}
        if run.known is not None:
            corrections = run.reconstruction_corrections(executor, model, conds, x_in, timestep, model_options)
        mergers = [None] * len(conds)
        for batch in run.batches(model, plan, conds, x_in):
            comfy.model_management.throw_exception_if_processing_interrupted()
            x_w = run.view(x_in, batch)
            if deltas is not None:
                x_w = x_w - torch.cat([deltas[i] for i in batch])
            t_w = timestep if len(batch) == 1 else timestep.repeat(len(batch))
            conds_w = [None if c is None else run.window_conds(c, batch, x_in, positive=ci == 0) for ci, c in enumerate(conds)]
            outs = executor(model, conds_w, x_w, t_w, model_options, *args, **kwargs)
            if run.config.focus is not None:  # one region, which is the whole latent
                return [out - corrections.get(0, 0.0) for out in outs]
            for ci, out in enumerate(outs):
                if mergers[ci] is None:
                    mergers[ci] = Merger(plan, out[:x_in.shape[0]].new_zeros(x_in.shape))
                for i, part in zip(batch, out.chunk(len(batch))):
                    # the same shift of cond and uncond shifts the CFG result by it
                    mergers[ci].add(i, part - corrections[i] if i in corrections else part)
        outs = [m.result() for m in mergers]
        if deltas is not None:
            moved = Merger(plan, deltas[0].new_zeros(x_in.shape))
            for i, d in enumerate(deltas):
                moved.add(i, d)
            shift = moved.result().to(outs[0].dtype)
            outs = [fold_update(o, shift, r) for o in outs]
        return outs
    finally:
        if transient:
            run.close()


# models whose adm vector carries SDXL's size conditioning (original size, crop, target size)
SIZE_CONDITIONED = (comfy.model_base.SDXL, comfy.model_base.SDXLRefiner)


def window_adm(model, cond: dict, y, plan, indices, batch: int, pooled=None):
    """The `y` model cond of the regions `indices`, computed by the model's own encode_adm with each region's
    pooled text embedding (per-factor prompts: SDXL, SD3, Flux) and, for SDXL, its size conditioning
    (sampling/conditioning.py: window_size_conditioning), stacked like the latents."""
    px, origins = latent_geometry(model)[0], crop_origins(plan)
    parts = []
    for i in indices:
        kwargs = dict(cond)
        if isinstance(model, SIZE_CONDITIONED):
            kwargs.update(window_size_conditioning(cond, origins[i], plan.regions[i].size, plan.canvas, px))
        if pooled:
            kwargs["pooled_output"] = pooled[i]
        parts.append(comfy.utils.repeat_to_batch_size(model.encode_adm(**kwargs), batch))
    return y._copy_with(torch.cat(parts).to(y.cond.device, y.cond.dtype))


def stack_regions(canvas: torch.Tensor, regions, batch: int) -> torch.Tensor:
    """The regions of `canvas` stacked window-major along dim 0, each broadcast to `batch`."""
    parts = [gather(canvas, r) for r in regions]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([comfy.utils.repeat_to_batch_size(p, batch) for p in parts])


class _Run:
    """State of one sampling run: the resolved layout and the per-window ControlNet copies."""

    def __init__(self, config: WindowedConfig):
        self.config = config
        self.cfg = None
        self.plan = None
        self.known = None         # Reconstruction: (known latent, 1 on known cells), as the sampled latent
        self.canvas_hints = {}    # id(control) -> (control, canvas-sized hint, px per cell)
        self.controls = {}        # (id(control), windows) -> (control, chain copy)

    def layout(self, model, x_in):
        self.model = model  # the BaseModel: per-window model conds are computed with it
        focus = self.config.focus
        if focus is not None:  # the latent is one region of a larger canvas: conds are cropped from that canvas
            if self.plan is None:
                full = layout_for(self.config.plan, model, focus[0])
                i = focus[1]
                self.plan = replace(full, regions=(full.regions[i],), coefficients=(1.0,), anchor=0, factors_of=(),
                                    prompts=(full.prompts[i],) if full.prompts else (),
                                    pooled=(full.pooled[i],) if full.pooled else ())
            if tuple(x_in.shape[-2:]) != self.plan.regions[0].size:
                raise ValueError(f"latent_image: {tuple(x_in.shape[-2:])} is not the size of the window it samples")
        elif self.plan is None or self.plan.canvas != tuple(x_in.shape[-2:]):
            self.plan = layout_for(self.config.plan, model, x_in.shape)
        return self.plan

    def view(self, t, batch):
        """The regions of `batch` cut out of a latent-sized tensor (a focused run's latent is its region)."""
        if self.config.focus is not None:
            return t
        return stack_regions(t, [self.plan.regions[i] for i in batch], t.shape[0])

    def batches(self, model, plan, conds, x_in):
        """Runs of region indices to denoise in one model call; only regions of one size batch together
        (factor graphs mix factor and variable sizes)."""
        size = self.config.window_batch
        if any(c is not None and any("area" in d for d in c) for c in conds):
            size = 1  # area conds are intersected with each window, so windows differ in their conds
        elif size <= 0:
            size = _auto_window_batch(model, plan, conds, x_in)
        by_size = {}
        for i, region in enumerate(plan.regions):
            # per-region prompts of different token counts batch only where ComfyUI could (CLIP pads, T5 / Qwen cannot)
            by_size.setdefault((region.size, plan.prompts[i].shape[-2] if plan.prompts else None), []).append(i)
        size = max(1, size)
        return [tuple(ids[s:s + size]) for ids in by_size.values() for s in range(0, len(ids), size)]

    def window_conds(self, cond_list, batch, x_in, positive=False):
        out = []
        for d in cond_list:
            w = self._window_cond(d, batch, x_in, positive)
            if w is not None:
                out.append(w)
        return out

    def _window_cond(self, d, batch, x_in, positive=False):
        if "gligen" in d:
            raise ValueError("positive/negative: GLIGEN box conditioning is placed on the whole canvas and "
                             "cannot be split into ControlSync windows; remove the GLIGEN node.")
        regions = [self.plan.regions[i] for i in batch]
        B = x_in.shape[0]
        w = dict(d)
        if "area" in d:
            area = _window_area(d["area"], regions[0])
            if area is None:
                return None
            w["area"] = area
        if d.get("mask") is not None:
            w["mask"] = stack_regions(self._canvas_sized(d["mask"], "mask"), regions, B)
        if d.get("model_conds"):
            w["model_conds"] = {k: self._window_model_cond(v, regions, B) for k, v in d["model_conds"].items()}
            prompted = positive and self.plan.prompts and "area" not in d and d.get("mask") is None
            if prompted:
                w["model_conds"]["c_crossattn"] = self._region_prompt(d["model_conds"].get("c_crossattn"), batch, B)
            pooled = self.plan.pooled if prompted and self.plan.pooled else None
            y = w["model_conds"].get("y")
            if y is not None and "unclip_conditioning" not in d and (pooled or isinstance(self.model, SIZE_CONDITIONED)):
                w["model_conds"]["y"] = window_adm(self.model, d, y, self.plan, batch, B, pooled)
        if d.get("control") is not None:
            w["control"] = self._control_chain(d["control"], batch, B)
        return w

    def _canvas_sized(self, t, name):
        if tuple(t.shape[-2:]) != self.plan.canvas:
            raise ValueError(f"positive/negative: a conditioning {name} of size {tuple(t.shape[-2:])} does not "
                             f"match the canvas latent {self.plan.canvas}")
        return t

    def _window_model_cond(self, c, regions, B):
        if isinstance(c, comfy.conds.CONDNoiseShape) and tuple(c.cond.shape[-2:]) == self.plan.canvas:
            return c._copy_with(stack_regions(c.cond, regions, B))
        return c

    def _region_prompt(self, original, batch, B):
        """The regions' own text embeddings in place of the positive prompt's, stacked like the latents."""
        if original is None:
            raise ValueError("plan: per-factor prompts need a model that takes text embeddings (c_crossattn)")
        device, dtype = original.cond.device, original.cond.dtype
        parts = [original._copy_with(self.plan.prompts[i].to(device, dtype)) for i in batch]
        if len(parts) == 1:
            return parts[0]
        # CONDCrossAttn.concat pads differing token counts the way ComfyUI batches prompts
        stacked = [original._copy_with(comfy.utils.repeat_to_batch_size(p.cond, B)) for p in parts]
        return original._copy_with(stacked[0].concat(stacked[1:]))

    def _control_chain(self, control, batch, B):
        """One chain of ControlBase copies per batch of windows, shared by positive and negative
        (ComfyUI batches cond with uncond only when they carry the same control object)."""
        key = (id(control), batch)
        if key not in self.controls:
            regions = [self.plan.regions[i] for i in batch]
            chain, node = [], control
            while node is not None:
                copy = node.copy()
                for name in _CONTROL_RUN_STATE:
                    if hasattr(node, name) and getattr(copy, name, None) is None:
                        setattr(copy, name, getattr(node, name))
                hint, ratio = self._canvas_hint(node)
                scaled = [r.scaled(ratio) for r in regions]
                extra = [stack_regions(_resize_like_comfy(e, hint.shape[-2:], node.upscale_algorithm), scaled, B)
                         for e in node.extra_concat_orig]
                copy.set_cond_hint(stack_regions(hint, scaled, B), strength=node.strength,
                                   timestep_percent_range=node.timestep_percent_range, vae=node.vae,
                                   extra_concat=extra)
                chain.append(copy)
                node = node.previous_controlnet
            for a, b in zip(chain, chain[1:]):
                a.set_previous_controlnet(b)
            self.controls[key] = (control, chain[0])
        return self.controls[key][1]

    def _canvas_hint(self, control):
        """The hint resized to the canvas exactly as ComfyUI would resize it for a full-canvas call."""
        if id(control) not in self.canvas_hints:
            H, W = self.plan.canvas
            ratio = control.compression_ratio
            if control.vae is not None:
                ratio *= control.vae.spacial_compression_encode()
            hint = control.cond_hint_original
            check_hint_aspect(tuple(hint.shape[-2:]), (H * ratio, W * ratio))
            self.canvas_hints[id(control)] = (control, _resize_like_comfy(hint, (H * ratio, W * ratio), control.upscale_algorithm), ratio)
        _, hint, ratio = self.canvas_hints[id(control)]
        return hint, ratio

    def sync_step(self, model_options, timestep, plan):
        """(w_t, sigma, sigma_next / sigma) when this model call is a synced step, else None."""
        sync = self.config.sync
        if sync is None or len(plan.regions) < 2:
            return None
        schedule = model_options.get("transformer_options", {}).get("sample_sigmas")
        if schedule is None:
            return None
        index = step_index(float(timestep[0]), schedule)
        if index is None:
            return None
        weight = sync.schedule.weight_at(index, len(schedule) - 1)
        if weight == 0.0:
            return None
        sigma = float(schedule[index])
        return weight, sigma, float(schedule[index + 1]) / sigma

    @contextlib.contextmanager
    def differentiable_denoiser(self, executor, model, conds, x_in, timestep, model_options, extra_modules=()):
        """denoise(i, x): region i's CFG x0-prediction at x, differentiable in x (inside inference mode)."""
        grad_options = comfy.model_patcher.create_model_options_clone(model_options)
        patches = grad_options.setdefault("transformer_options", {}).setdefault("patches", {})
        # ControlNet residuals are added in place (h += ctrl) to skip tensors that the next block saved
        # for backward; a copy after the skip connection keeps the saved tensor intact
        patches["input_block_patch_after_skip"] = list(patches.get("input_block_patch_after_skip", [])) + [_copy_after_skip]
        if self.cfg is None:
            raise ValueError("sync / plan: AnchorSync and Reconstruction guidance need the guider's cfg scale; use "
                             "ControlSync Sampler, KSampler or CFGGuider with the windowed model")

        def denoise(i, x):
            conds_w = [None if c is None else self.window_conds(c, (i,), x_in, positive=ci == 0)
                       for ci, c in enumerate(conds)]
            outs = executor(model, conds_w, x, timestep, grad_options)
            return comfy.samplers.cfg_function(model, outs[0], outs[1], self.cfg, x, timestep,
                                               model_options=grad_options, cond=conds_w[0], uncond=conds_w[1])

        with autograd_through([model.diffusion_model] + _control_modules(conds) + list(extra_modules)):
            yield denoise

    def reconstruction_corrections(self, executor, model, conds, x_in, timestep, model_options):
        """DiffCollage's Reconstruction: for every region holding known cells, (w / 2) grad ||H D - y||^2,
        one region's graph at a time."""
        known, mask = (t.to(x_in.device, x_in.dtype) for t in self.known)
        weight, out = self.config.reconstruction, {}
        with self.differentiable_denoiser(executor, model, conds, x_in, timestep, model_options) as denoise:
            for i in range(len(self.plan.regions)):
                m = self.view(mask, (i,))
                if not bool(m.any()):
                    continue
                comfy.model_management.throw_exception_if_processing_interrupted()
                # clones: tensors made in inference mode cannot be saved for backward
                out[i], _ = reconstruction_correction(self.view(x_in, (i,)), functools.partial(denoise, i),
                                                        self.view(known, (i,)).clone(), m.clone(), weight)
        return out

    def sync_deltas(self, executor, model, conds, x_in, timestep, model_options, weight, sigma):
        """Every window's gradient step toward the anchor, one window's graph at a time."""
        sync, plan = self.config.sync, self.plan
        vae = sync.vae
        modules = []
        if sync.loss_decoder == "taesd":
            taesd = load_taesd(model.latent_format, x_in.device)
            device, loss_dtype = x_in.device, torch.float32
        else:
            comfy.model_management.load_models_gpu(comfy.model_management.loaded_models(only_currently_used=True) + [vae.patcher])
            modules.append(vae.first_stage_model)
            # LPIPS in float32 (float64 when the VAE runs in float64: exact gradient checks)
            device, loss_dtype = vae.device, (torch.float64 if vae.vae_dtype == torch.float64 else torch.float32)
        with self.differentiable_denoiser(executor, model, conds, x_in, timestep, model_options, modules) as denoise:
            loss_net = load_lpips(sync.loss_net, device, loss_dtype)
            latent_format = autograd_copy(model.latent_format)

            def decode(x0):
                if sync.loss_downscale > 1:
                    k = sync.loss_downscale  # over height and width (one-frame video latents: (B, C, 1, H, W))
                    x0 = torch.nn.functional.avg_pool2d(x0, k) if x0.ndim == 4 else torch.nn.functional.avg_pool3d(x0, (1, k, k))
                if sync.loss_decoder == "taesd":  # TAESD reads the model-space latent, as in ComfyUI's previews
                    return taesd.decode(x0.float()).to(loss_dtype)
                z = latent_format.process_out(x0).to(vae.device, vae.vae_dtype)
                image = vae.first_stage_model.decode(z)
                return (image[:, :, 0] if image.ndim == 5 else image).to(loss_dtype)  # video VAEs: the one frame

            def loss(image, anchor_image):
                return loss_net(image.to(anchor_image.device), anchor_image, normalize=False)

            latents = [gather(x_in, r).clone() for r in plan.regions]
            with torch.no_grad():
                anchor_image = lpips_input(decode(denoise(plan.anchor, latents[plan.anchor])))

            def gradient(i, x):
                comfy.model_management.throw_exception_if_processing_interrupted()
                return window_sync_gradient(x, functools.partial(denoise, i), decode, loss, anchor_image,
                                            through_model=sync.through_model)

            deltas, skipped = sync_deltas(latents, plan.anchor, weight, sigma, gradient, parameterisation(model))
        if skipped:
            logging.warning(f"ControlSync AnchorSync: non-finite sync loss or gradient at sigma {sigma:.4g} for "
                            f"window(s) {skipped}; they skip this sync step")
        return [d.detach() for d in deltas]

    def close(self):
        for _, head in self.controls.values():
            head.cleanup()
        self.controls.clear()
        self.canvas_hints.clear()


def _copy_after_skip(h, transformer_options):
    return h.clone()


def _control_modules(conds):
    modules, seen = [], set()
    for cond_list in conds:
        for d in cond_list or ():
            node = d.get("control")
            while node is not None:
                for name in ("control_model", "t2i_model"):
                    m = getattr(node, name, None)
                    if isinstance(m, torch.nn.Module) and id(m) not in seen:
                        seen.add(id(m))
                        modules.append(m)
                node = node.previous_controlnet
    return modules


@contextlib.contextmanager
def autograd_through(modules):
    """Autograd inside ComfyUI's inference mode: weights loaded there are inference tensors, which
    autograd cannot save for backward. Swap them for plain copies (no requires_grad) while the
    gradient pass runs, and put the user's own tensors back afterwards, whatever happens."""
    swapped, seen = [], set()
    with torch.inference_mode(False), torch.enable_grad():
        try:
            for module in modules:
                for sub in module.modules():
                    if id(sub) in seen:
                        continue
                    seen.add(id(sub))
                    for store in (sub._parameters, sub._buffers):
                        for name, t in list(store.items()):
                            if t is not None and t.is_inference():
                                copy = t.clone()
                                store[name] = torch.nn.Parameter(copy, requires_grad=False) if isinstance(t, torch.nn.Parameter) else copy
                                swapped.append((store, name, t))
            with torch.autograd.graph.saved_tensors_hooks(_saved_copy, _saved_value):
                yield
        finally:
            for store, name, t in reversed(swapped):
                store[name] = t


def autograd_copy(obj):
    """A shallow copy of `obj` whose tensor attributes made in inference mode are plain tensors autograd can
    save (Wan's latent format, used by Qwen-Image, keeps its per-channel mean and std as tensors). Call it
    inside autograd_through."""
    out = copy.copy(obj)
    for name, value in vars(obj).items():
        if torch.is_tensor(value) and value.is_inference():
            setattr(out, name, value.clone())
    return out


def _saved_copy(t):
    """Model code written for inference adds in place to activations that autograd saved for backward (Flux's
    single-stream blocks, the ControlNet residuals of Flux, SD3 and Qwen-Image): a copy of each saved activation
    keeps the value the backward pass needs. Weights and constants (no grad) are never modified: kept as is."""
    return t.clone() if t.requires_grad else t


def _saved_value(t):
    return t


_lpips_cache: dict = {}


# where users put the LPIPS backbone files (also settable in extra_model_paths.yaml as `lpips:`)
folder_paths.add_model_folder_path("lpips", os.path.join(folder_paths.models_dir, "lpips"))


def lpips_backbone_path(net: str) -> str:
    """The torchvision ImageNet backbone file LPIPS needs, from ComfyUI's models/lpips or torch's hub cache."""
    return find_backbone(net, list(folder_paths.get_folder_paths("lpips")) + [hub_checkpoints()])


def load_lpips(net: str, device, dtype=torch.float32):
    key = (net, str(device), dtype)
    if key not in _lpips_cache:
        _lpips_cache[key] = build_lpips(net, lpips_backbone_path(net)).to(device, dtype)
    return _lpips_cache[key]


_taesd_cache: dict = {}


def load_taesd(latent_format, device):
    """ComfyUI's TAESD decoder for this model (the file its TAESD previews use), built for autograd."""
    import comfy.taesd.taesd
    name = latent_format.taesd_decoder_name
    found = next((f for f in folder_paths.get_filename_list("vae_approx") if name and f.startswith(name)), None)
    if found is None:
        raise ValueError(f"sync: loss_decoder 'taesd' needs TAESD's decoder for this model in ComfyUI/models/vae_approx/ "
                         f"({name or 'this model has no TAESD'}.safetensors, the file ComfyUI's TAESD previews use); "
                         f"or set loss_decoder to 'vae'")
    path = folder_paths.get_full_path("vae_approx", found)
    key = (path, str(device))
    if key not in _taesd_cache:
        with torch.inference_mode(False):
            taesd = comfy.taesd.taesd.TAESD(None, path, latent_channels=latent_format.latent_channels)
            _taesd_cache[key] = taesd.to(device).eval().requires_grad_(False)
    return _taesd_cache[key]


def _resize_like_comfy(image, hw, algorithm):
    return comfy.utils.common_upscale(image, hw[1], hw[0], algorithm, "center")


def check_hint_aspect(hint_hw, canvas_hw) -> None:
    """Refuse a hint that ComfyUI's center crop would cut by a latent cell or more at canvas scale."""
    (hh, hw), (ch, cw) = hint_hw, canvas_hw
    hint_aspect, canvas_aspect = hw / hh, cw / ch
    if hint_aspect > canvas_aspect:
        cut_px = (1 - canvas_aspect / hint_aspect) * cw
    else:
        cut_px = (1 - hint_aspect / canvas_aspect) * ch
    if cut_px >= 8:
        raise ValueError(
            f"ControlNet image: the condition image is {hw}x{hh} (aspect {hint_aspect:.3f}) but the canvas is "
            f"{cw}x{ch} (aspect {canvas_aspect:.3f}); ComfyUI would center-crop {cut_px:.0f} px of the condition "
            f"away. Resize or pad the condition image to the canvas aspect, or plan the canvas from the image.")


def _window_area(area, region):
    """A resolved (h, w, y, x) area intersected with the window, in window coordinates; None if disjoint."""
    if len(area) != 4:
        raise ValueError("positive/negative: only 2-D conditioning areas can be split into windows")
    rect = region.rect
    if rect is None:
        raise ValueError("positive/negative: area conditioning cannot follow a region that wraps around the "
                         "canvas; use a mask (ConditioningSetMask) instead")
    h, w, y, x = area
    ry, rx, rh, rw = rect
    y0, y1 = max(y, ry), min(y + h, ry + rh)
    x0, x1 = max(x, rx), min(x + w, rx + rw)
    if y1 <= y0 or x1 <= x0:
        return None
    return (y1 - y0, x1 - x0, y0 - ry, x0 - rx)


def _auto_window_batch(model, plan, conds, x_in) -> int:
    """On a GPU, as many windows per call as fit in free memory with ComfyUI's own 1.5x margin
    (twice the UNet estimate when ControlNets run too). On the CPU one: larger batches bring no
    parallelism there and measured slower (tests/benchmark_windows.py)."""
    if x_in.device.type == "cpu":
        return 1
    h, w = max(r.size for r in plan.regions)
    n_conds = sum(c is not None for c in conds)
    shape = [x_in.shape[0] * max(n_conds, 1), x_in.shape[1], h, w]
    per_window = model.memory_required(shape)
    has_control = any(c is not None and any(d.get("control") is not None for d in c) for c in conds)
    per_window *= 2 if has_control else 1
    free = comfy.model_management.get_free_memory(x_in.device)
    return max(1, math.floor(free / (1.5 * per_window)))
