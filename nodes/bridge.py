"""The one module that talks to ComfyUI internals.

Windowed sampling is a CALC_COND_BATCH wrapper on a clone of the user's model: it sits below CFG,
sees the conds before any ControlNet ran, and calls ComfyUI's own cond batching once per batch of
regions with cropped latents, masks, spatial model conds and real `ControlBase` copies whose hints
are crops of the canvas-sized hint. Nothing is patched globally and nothing mutable is stored in
`model_options`: an OUTER_SAMPLE wrapper builds an immutable `RunContext` for the run and the
little mutable state a run needs (`_RunState`), held in a context variable.

One model evaluation of the sampler runs, for the canvas:
  - AnchorSync, at a synced step's first evaluation (`sync_moves`): the factors' gradient passes
    toward the anchor, through the guider's own math (`guided_x0`: the guider is called on a batch
    of windows, and this wrapper, seeing a focus, evaluates just those windows);
  - the batched denoising pass over every region (`denoise_regions`), at the moved latents;
  - the merge and the fold of the sync moves into the denoised output (`merge_and_fold`);
  - Reconstruction guidance for known pixels (`reconstruction_correction`).
Nested calls within the same evaluation (guidance that calls the model again from a post-CFG
function, like PAG) are evaluated at the same moved latents and folded the same way; they never
sync again.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import logging
import math
import os
from dataclasses import dataclass, field, replace

import torch

import comfy.conds
import comfy.ldm.modules.diffusionmodules.openaimodel
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

from ..sampling import MergeRule, PlanError, gather, rect_region, scatter_set
from ..sampling.conditional import autoregressive_order, collage_reconstruction
from ..sampling.conditioning import crop_origins, window_size_conditioning
from ..sampling.perceptual import build_lpips, find_backbone, hub_checkpoints
from ..sampling.steps import StepPatternError, first_evaluations
from ..sampling.sync import (SyncSchedule, factor_indices, fold_update, identity_through, kappa_bound, lpips_input,
                             noise_level, region_moves, shrinkage, sync_deltas, window_sync_gradient)

WRAPPER_KEY = "controlsync.windows"
# pre-run state that ControlBase.copy() does not carry over (set by pre_run on the originals)
_CONTROL_RUN_STATE = ("timestep_range", "model_sampling_current", "control_model", "manual_cast_dtype")
# activations kept for backward, against ComfyUI's inference estimate of one window's model call
_GRADIENT_MEMORY_FACTOR = 3.0
# an SD-sized decoder + LPIPS-VGG, forward and backward in float32, bytes per decoded pixel (measured on the
# CPU, 2026-12-01: tests/benchmark_sync.py --measure-loss-memory gives 28149; half-precision decoders need less)
_LOSS_BYTES_PER_PIXEL = 28_000

_run_state: contextvars.ContextVar["_RunState | None"] = contextvars.ContextVar("controlsync_run", default=None)
_focus: contextvars.ContextVar["_Focus | None"] = contextvars.ContextVar("controlsync_focus", default=None)


@dataclass(frozen=True)
class SyncSettings:
    """What AnchorSync asks for (the SYNC socket type)."""
    schedule: SyncSchedule
    vae: object              # comfy.sd.VAE: the decoder the loss looks through
    loss_net: str = "vgg"    # LPIPS backbone
    through_model: bool = True  # False: the fast mode (model Jacobian skipped, one model evaluation per step)
    loss_downscale: int = 1     # 2: the loss looks at x0 decoded at half size (4x cheaper decoder and LPIPS)
    loss_decoder: str = "vae"   # "taesd": ComfyUI's tiny differentiable decoder (models/vae_approx) instead


@dataclass(frozen=True)
class WindowedConfig:
    """Immutable: safe to share between model clones."""
    plan: object          # anything with .layout(latent_hw, factor, multiple) -> RegionPlan
    window_batch: int     # windows per model call; 0 = as many as memory allows
    sync: SyncSettings | None = None
    focus: tuple | None = None   # (canvas latent shape, region index): sample only that region's latent
    schedule_position: tuple | None = None  # (offset, total): the run is steps offset.. of a total-step schedule

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


# ComfyUI 0.33's ControlNets as MODEL patches (ModelPatchLoader + ZImageFunControlnet / QwenImageDiffsynthControlnet,
# SUPIR, Anima LLLite, Wan Uni3C): they hold their control image on the model and resize it to whatever latent a
# call gets, so every window would get the whole canvas' control squashed into it; not cropped per window yet
_CONTROL_PATCHES = {"ZImageControlPatch": "Z-Image Fun ControlNet", "DiffSynthCnetPatch": "Qwen-Image DiffSynth ControlNet",
                    "SUPIRPatch": "SUPIR", "AnimaLLLitePatch": "Anima LLLite", "WanUni3CCnetPatch": "Wan Uni3C ControlNet"}


def refuse_unsupported(model_options: dict) -> None:
    for kind in model_options.get("transformer_options", {}).get("patches", {}).values():
        for patch in kind if isinstance(kind, (list, tuple)) else ():
            name = _CONTROL_PATCHES.get(type(patch).__name__)
            if name is not None:
                raise ValueError(f"model: a {name} is applied to this MODEL as a model patch ({type(patch).__name__}); "
                                 f"it holds the control image on the model and would give every ControlSync window "
                                 f"the whole canvas' control squashed into it: model-patch ControlNets are not cropped "
                                 f"per window yet. Sample this model without ControlSync, or without the patch.")
    if model_options.get("context_handler") is not None:
        raise ValueError("model: ComfyUI's context windows are active on this MODEL (a context-window node is "
                         "upstream); they do not crop ControlNet hints and cannot be combined with ControlSync "
                         "windows. Remove the context-window node, or sample without ControlSync.")
    if "multigpu_clones" in model_options:
        raise ValueError("model: this MODEL is set up for ComfyUI's multi-GPU sampling; ControlSync windows need "
                         "one device. Remove the multi-GPU node for this sampler.")
    if "sampler_calc_cond_batch_function" in model_options:
        raise ValueError("model: a node upstream replaces ComfyUI's cond batching (sampler_calc_cond_batch_function); "
                         "ControlSync windows run inside it and cannot be combined with that node.")
    for fn in model_options.get("sampler_post_cfg_function", []):
        if getattr(fn, "__module__", "").endswith("nodes_sag"):
            raise ValueError("model: Self-Attention Guidance reads one attention map for the whole latent; with "
                             "ControlSync windows it would see one window's map stretched over the canvas. Remove the "
                             "Self-Attention Guidance node (Perturbed-Attention Guidance works per window).")


def windowed_model(model, plan, window_batch: int = 0, sync: SyncSettings | None = None, focus=None,
                   schedule_position=None):
    """A clone of `model` whose sampling runs the plan's windows; `model` itself is untouched.
    `schedule_position`: (offset, total) when the caller knows the run samples steps offset.. of a
    total-step schedule (KSampler's denoise), for AnchorSync's step count."""
    refuse_unsupported(model.model_options)
    if sync is not None:
        parameterisation(model)  # refuse an unknown parameterisation before sampling starts
    if model.get_wrappers(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY):
        raise ValueError("model: this MODEL already carries a ControlSync window plan (from ControlSync Windowed "
                         "Model); connect the original MODEL instead of windowing it twice.")
    config = WindowedConfig(plan, int(window_batch), sync, focus, schedule_position)
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


# --- one sampling run ---------------------------------------------------------------------------

@dataclass(frozen=True)
class RunContext:
    """What a run needs that does not change while it runs."""
    config: WindowedConfig
    plan: object                 # RegionPlan laid out on this run's latent (one region when focused)
    merge: MergeRule
    model: object                # the BaseModel (per-window model conds are computed with it)
    guider: object = None        # the CFGGuider sampling (None: a call outside a sampling run)
    parameterisation: str = "ve"  # the space AnchorSync steps in (sampling/sync.py)
    step_weights: tuple = ()     # AnchorSync's w_t for every sampler step (empty: no sync)
    sigmas: tuple = ()           # the run's schedule
    seed: int | None = None

    @property
    def synced(self) -> bool:
        return any(w > 0 for w in self.step_weights)


@dataclass
class _Evaluation:
    """What one model evaluation of the sampler shares between its calls."""
    index: int
    sync: object = None               # _SyncMoves of a synced evaluation
    outputs: dict = field(default_factory=dict)  # (options id, conds key, region) -> per cond output
    correction: object = None         # Reconstruction's correction of the denoised outputs
    calls: int = 0


class _RunState:
    """The mutable part of a run: evaluation counter, per-window conds and ControlNet copies,
    batch sizes (chosen once), and the known pixels of Reconstruction."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.conds = WindowConds(ctx.plan, ctx.model)
        self.known = None            # Reconstruction: (known latent, 1 on known cells), as the sampled latent
        self.evaluations = 0         # model evaluations the sampler made so far
        self.tracked = False         # counted at the sampler (else: each outermost call is one evaluation)
        self.depth = 0               # canvas passes under way (nested guider calls)
        self.first_evals: dict[int, int] = {}  # evaluation number -> sampler step it starts (synced runs)
        self.open_step = None        # (_SyncMoves, sigma, sigma_next) of the synced step under way
        self.evaluation: _Evaluation | None = None
        self.denoise_batch = None    # regions per denoising call, chosen at the first call
        self.gradient_batch = None   # windows per gradient graph, chosen at the first gradient pass

    def current_evaluation(self) -> _Evaluation:
        if self.evaluation is None or self.evaluation.index != self.evaluations:
            self.evaluation = _Evaluation(self.evaluations)
        return self.evaluation

    def sync_step(self, timestep) -> tuple[float, float, float] | None:
        """(w_t, sigma, sigma_next / sigma) when the current evaluation starts a synced step, else None."""
        step = self.first_evals.get(self.evaluations - 1)
        if step is None or self.ctx.step_weights[step] == 0.0:
            return None
        sigma = float(timestep.flatten()[0])
        return self.ctx.step_weights[step], sigma, self.ctx.sigmas[step + 1] / sigma

    def continued_sync(self, x_in, timestep):
        """The moves of the synced step under way, for a later evaluation of that step (Heun's and DPM2's
        second, a corrector's) at noise level s: see `_SyncMoves.continued`."""
        if self.evaluations - 1 in self.first_evals:
            self.open_step = None  # an unsynced step starts
        if self.open_step is None:
            return None
        moves, sigma, sigma_next = self.open_step
        s = float(timestep.flatten()[0])
        if not sigma_next <= s <= sigma or sigma <= sigma_next:
            return None
        return moves.continued(self, x_in, (s - sigma_next) / (sigma - sigma_next))

    def roles(self, conds) -> list:
        """What each cond list is to the guider ('positive', 'negative', 'middle', ...), by identity with
        the guider's own conds; without a guider (a call outside a run), positive then negative."""
        named = {id(v): k for k, v in (getattr(self.ctx.guider, "conds", None) or {}).items()}
        if not named:
            return ["positive", "negative"][:len(conds)] + [None] * max(0, len(conds) - 2)
        return [named.get(id(c)) for c in conds]

    def crop_conds(self, conds, batch, B) -> list:
        return [None if c is None else self.conds.crop(c, batch, B, role) for c, role in zip(conds, self.roles(conds))]

    def denoise_batch_size(self, model, conds, x_in) -> int:
        if self.denoise_batch is None:
            size = self.ctx.config.window_batch
            if _has_area(conds):
                size = 1  # area conds are intersected with each window, so windows differ in their conds
            elif size <= 0:
                size = _automatic_batch(model, self.ctx.plan, conds, x_in)
            self.denoise_batch = max(1, size)
        return self.denoise_batch

    def gradient_batch_size(self, model, conds, x_in) -> int:
        """Windows per gradient graph. Only guiders whose math is per sample may stack windows
        (PerpNeg, for one, projects over the whole batch)."""
        if self.gradient_batch is None:
            size = self.ctx.config.window_batch
            if type(self.ctx.guider).__name__ not in _PER_SAMPLE_GUIDERS or _has_area(conds):
                size = 1
            elif size <= 0:
                size = _automatic_batch(model, self.ctx.plan, conds, x_in, gradient=True)
            self.gradient_batch = max(1, size)
        return self.gradient_batch

    def close(self):
        self.conds.close()


_PER_SAMPLE_GUIDERS = ("CFGGuider", "Guider_Basic", "Guider_DualCFG")


def _has_area(conds) -> bool:
    return any(c is not None and any("area" in d for d in c) for c in conds)


@dataclass(frozen=True)
class _Focus:
    """A call that evaluates only some regions (gradient passes, the anchor, a focused window), with
    outputs already computed to hand back instead of evaluating again."""
    run: _RunState
    regions: tuple
    record: bool = False


def _outer_sample(config, executor, noise, latent_image, sampler, sigmas, denoise_mask=None, *args, **kwargs):
    guider = executor.class_obj
    patcher = guider.model_patcher
    refuse_unsupported(guider.model_options)
    ctx = _run_context(config, guider, noise.shape, sigmas, kwargs.get("seed", args[2] if len(args) > 2 else None))
    run = _RunState(ctx)
    sampler = _counted_sampler(sampler, run)
    if config.reconstruction is not None and denoise_mask is not None:
        # Reconstruction instead of ComfyUI's Replacement: keep the mask (1 = to generate) for the
        # guidance and sample without it
        mask = comfy.sampler_helpers.prepare_mask(denoise_mask, noise.shape, noise.device)
        run.known = (patcher.model.process_latent_in(latent_image.to(noise.device)), 1.0 - mask)
        denoise_mask = None
    token = _run_state.set(run)
    try:
        return executor(noise, latent_image, sampler, sigmas, denoise_mask, *args, **kwargs)
    except BaseException:
        # ComfyUI resets the user's ControlNets (pre-run state, cached hints) only after a successful
        # run; on errors and Cancel we do it too, so they are left exactly as before the run.
        _cleanup_controls(getattr(guider, "conds", None))
        raise
    finally:
        _run_state.reset(token)
        run.close()


def _run_context(config, guider, latent_shape, sigmas, seed) -> RunContext:
    patcher = guider.model_patcher
    plan = _focused_layout(config, patcher, latent_shape)
    weights = ()
    if config.sync is not None and config.focus is None and len(plan.regions) > 1:
        model_sampling = patcher.get_model_object("model_sampling")
        schedule = [float(s) for s in sigmas]
        position = config.schedule_position
        if position is None and _is_whole_schedule(model_sampling, sigmas):
            position = (0, len(schedule) - 1)
        weights = tuple(config.sync.schedule.step_weights(
            schedule, lambda s: noise_level(s, model_sampling.percent_to_sigma), position))
    kind = parameterisation(patcher) if weights else "ve"
    return RunContext(config, plan, MergeRule(plan), patcher.model, guider, kind, weights,
                      tuple(float(s) for s in sigmas), seed)


def _is_whole_schedule(model_sampling, sigmas) -> bool:
    """Whether `sigmas` are one of ComfyUI's schedulers' whole schedules at their step count."""
    steps = len(sigmas) - 1
    for name in comfy.samplers.SCHEDULER_NAMES:
        try:
            whole = comfy.samplers.calculate_sigmas(model_sampling, name, steps)
        except Exception:  # a scheduler that cannot make this many steps for this model
            continue
        if whole.shape == sigmas.shape and torch.allclose(whole.to(sigmas), sigmas, rtol=1e-5, atol=1e-8):
            return True
    return False


def _focused_layout(config, model, latent_shape):
    focus = config.focus
    if focus is None:
        return layout_for(config.plan, model, latent_shape)
    # the latent is one region of a larger canvas: conds are cropped from that canvas
    full = layout_for(config.plan, model, focus[0])
    i = focus[1]
    plan = replace(full, regions=(full.regions[i],), coefficients=(1.0,), anchor=0, factors_of=(),
                   prompts=(full.prompts[i],) if full.prompts else (), pooled=(full.pooled[i],) if full.pooled else ())
    if tuple(latent_shape[-2:]) != plan.regions[0].size:
        raise ValueError(f"latent_image: {tuple(latent_shape[-2:])} is not the size of the window it samples")
    return plan


def _cleanup_controls(conds) -> None:
    seen = set()
    for cond_list in (conds or {}).values():
        for d in cond_list:
            control = d.get("control")
            if control is not None and id(control) not in seen:
                seen.add(id(control))
                control.cleanup()


# --- which evaluation starts which step -----------------------------------------------------------

def _counted_sampler(sampler, run: _RunState):
    """The same sampler with its model evaluations counted (one evaluation may call the model's cond
    batching several times: guidance calling the model again) and, when AnchorSync runs, each step's
    first evaluation found beforehand (sampling/steps.py), so the windows move exactly once per step."""
    if not isinstance(sampler, comfy.samplers.KSAMPLER):
        if run.ctx.synced:
            raise ValueError(f"sync: AnchorSync needs one of ComfyUI's KSAMPLER samplers to find each step's first "
                             f"model evaluation; this sampler is a {type(sampler).__name__}. Use a KSampler sampler "
                             f"or disconnect sync.")
        return sampler
    return comfy.samplers.KSAMPLER(functools.partial(_counted_sampling, sampler.sampler_function, run),
                                   sampler.extra_options, sampler.inpaint_options)


def _counted_sampling(sampler_function, run, model, x, sigmas, *args, extra_args=None, callback=None, disable=None,
                      **options):
    extra_args = {} if extra_args is None else extra_args
    # the name users picked: k-diffusion's sample_<name>, or ComfyUI's <name>_function (dpm_fast, dpm_adaptive)
    name = getattr(sampler_function, "__name__", type(sampler_function).__name__).removeprefix("sample_").removesuffix("_function")
    firsts = None
    if run.ctx.synced:
        try:
            firsts = first_evaluations(sampler_function, model, x, sigmas, extra_args, **options)
        except StepPatternError as e:
            raise ValueError(f"sync: the sampler '{name}' does not take one step per point of the schedule ({e}); "
                             f"AnchorSync needs a fixed-step sampler (euler, ddim, dpmpp_2m, ...): choose another "
                             f"sampler or disconnect sync") from None
        run.first_evals = {n: i for i, n in enumerate(firsts)}
    run.tracked = True

    def counted_callback(d):
        if firsts is not None and d["i"] < len(firsts) and run.evaluations != firsts[d["i"]] + 1:
            raise ValueError(f"sync: the sampler '{name}' evaluated the model {run.evaluations} times before "
                             f"reporting step {d['i']} instead of {firsts[d['i']] + 1}: its pattern depends on the "
                             f"model's outputs, so AnchorSync cannot find its steps; choose a fixed-step sampler or "
                             f"disconnect sync")
        if callback is not None:
            callback(d)

    return sampler_function(_CountedModel(model, run), x, sigmas, *args, extra_args=extra_args,
                            callback=counted_callback, disable=disable, **options)


class _CountedModel:
    def __init__(self, model, run):
        self._model, self._run = model, run

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        self._run.evaluations += 1
        return self._model(*args, **kwargs)


# --- the wrapper ---------------------------------------------------------------------------------

def _calc_cond_batch(config, executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
    refuse_unsupported(model_options)
    run = _run_state.get()
    transient = run is None or run.ctx.config is not config
    if transient:  # called outside our OUTER_SAMPLE (another guider's path): state for this call only
        layout = _focused_layout(config, model, x_in.shape)
        run = _RunState(RunContext(config, layout, MergeRule(layout), model))
    call = functools.partial(executor, *args, **kwargs) if (args or kwargs) else executor
    try:
        focus = _focus.get()
        if focus is not None and focus.run is run:
            return _region_pass(run, focus, call, model, conds, x_in, timestep, model_options)
        return _canvas_pass(run, call, model, conds, x_in, timestep, model_options)
    finally:
        if transient:
            run.close()


def _conds_key(conds) -> tuple:
    return tuple(id(c) for c in conds)


def _region_pass(run, focus, executor, model, conds, x, timestep, model_options):
    """Evaluate only the focused regions (stacked along dim 0), or hand back outputs the evaluation
    already has for them."""
    ev = run.current_evaluation()
    key = (id(model_options), _conds_key(conds))
    known = [ev.outputs.get(key + (i,)) for i in focus.regions]
    if all(k is not None for k in known):
        return [torch.cat([k[ci] for k in known]) for ci in range(len(conds))]
    outs = executor(model, run.crop_conds(conds, focus.regions, x.shape[0] // len(focus.regions)), x, timestep,
                    model_options)
    if focus.record:
        for i, parts in zip(focus.regions, zip(*[o.chunk(len(focus.regions)) for o in outs])):
            ev.outputs[key + (i,)] = list(parts)
    return outs


def _canvas_pass(run, executor, model, conds, x_in, timestep, model_options):
    """One call of the sampler's model evaluation for the whole latent: sync (at a synced step's
    first call), the denoising pass, the merge and fold, Reconstruction."""
    if not run.tracked and run.depth == 0:
        run.evaluations += 1
    ev = run.current_evaluation()
    ev.calls += 1
    key = ("canvas", id(model_options), _conds_key(conds))
    if key in ev.outputs:  # the guider's math replayed on outputs this evaluation already merged
        return ev.outputs[key]
    run.depth += 1
    try:
        if run.ctx.config.focus is not None:  # the latent is the one region: no merge, no sync
            merged = _region_pass(run, _Focus(run, (0,)), executor, model, conds, x_in, timestep, model_options)
        else:
            sync = run.sync_step(timestep) if ev.calls == 1 else None
            fast = sync is not None and not run.ctx.config.sync.through_model
            if sync is not None and not fast:
                ev.sync = sync_moves(run, model, conds, x_in, timestep, model_options, sync, None)
            elif sync is None and ev.calls == 1:
                ev.sync = run.continued_sync(x_in, timestep)
            moved = ev.sync.moves if ev.sync is not None and ev.sync.shifts is None else None
            outputs = denoise_regions(run, executor, model, conds, x_in, timestep, model_options, moved, record=fast)
            if fast:
                ev.sync = sync_moves(run, model, conds, x_in, timestep, model_options, sync, outputs)
            if sync is not None:
                run.open_step = (ev.sync, sync[1], sync[1] * sync[2])
            merged = merge_and_fold(run, outputs, ev, x_in)
        ev.outputs[key] = merged
        if run.known is not None:
            if ev.correction is None and ev.calls == 1:
                ev.correction = reconstruction_correction(run, model, conds, x_in, timestep, model_options)
            if ev.correction is not None:
                merged = [o - ev.correction for o in merged]
        return merged
    finally:
        run.depth -= 1


# --- the batched denoising pass, the merge and the fold ------------------------------------------

def denoise_regions(run, executor, model, conds, x_in, timestep, model_options, moves, record=False):
    """Every region's outputs ({region: [per cond]}), its latent moved by `moves` when given, in batches of
    equal-size regions. Zero-coefficient regions add nothing to the merge and are skipped; outputs the
    evaluation already recorded for an unmoved region (the anchor) are reused; with `record`, the outputs
    are kept for the guider's math to be replayed on (the fast sync mode)."""
    plan, ev = run.ctx.plan, run.current_evaluation()
    key = (id(model_options), _conds_key(conds))
    B = x_in.shape[0]
    outputs, todo = {}, []
    for i, c in enumerate(plan.coefficients):
        recorded = ev.outputs.get(key + (i,))
        if c == 0:
            continue
        if recorded is not None and (moves is None or not bool(moves[i].any())):
            outputs[i] = recorded
        else:
            todo.append(i)
    for batch in _batches(plan, todo, run.denoise_batch_size(model, conds, x_in)):
        comfy.model_management.throw_exception_if_processing_interrupted()
        x_w = stack_regions(x_in, [plan.regions[i] for i in batch], B)
        if moves is not None:
            x_w = x_w - torch.cat([moves[i] for i in batch]).to(x_w)
        t_w = timestep if len(batch) == 1 else timestep.repeat(len(batch))
        outs = executor(model, run.crop_conds(conds, batch, B), x_w, t_w, model_options)
        for ci, out in enumerate(outs):
            for i, part in zip(batch, out.chunk(len(batch))):
                outputs.setdefault(i, [None] * len(outs))[ci] = part
    if record:
        for i, parts in outputs.items():
            ev.outputs.setdefault(key + (i,), parts)
    return outputs


def merge_and_fold(run, outputs, ev, x_in):
    """The canvas prediction of every cond, with this evaluation's sync moves folded in (the same shift of
    every cond shifts the guider's result by it: CFG's weights sum to 1)."""
    n_conds = len(next(iter(outputs.values())))
    like = next(iter(outputs.values()))[0]
    merged = []
    for ci in range(n_conds):
        merger = run.ctx.merge.merger(like[:x_in.shape[0]].new_zeros(x_in.shape))
        for i, parts in outputs.items():
            merger.add(i, parts[ci])
        merged.append(merger.result())
    if ev.sync is None:
        return merged
    move, shift = ev.sync.folded(run, merged[0])
    return [fold_update(o, move, ev.sync.r, shift) for o in merged]


def _merged(run, per_region, like):
    merger = run.ctx.merge.merger(like)
    for i, t in enumerate(per_region):
        merger.add(i, t.to(like))
    return merger.result()


def _batches(plan, indices, size):
    """Runs of region indices to evaluate in one call; only regions of one size batch together (factor
    graphs mix factor and variable sizes), and per-region prompts of one token count (CLIP pads, T5 and
    Qwen cannot)."""
    by_size = {}
    for i in indices:
        by_size.setdefault((plan.regions[i].size, plan.prompts[i].shape[-2] if plan.prompts else None), []).append(i)
    size = max(1, size)
    return [tuple(ids[s:s + size]) for ids in by_size.values() for s in range(0, len(ids), size)]


def stack_regions(canvas: torch.Tensor, regions, batch: int) -> torch.Tensor:
    """The regions of `canvas` stacked window-major along dim 0, each broadcast to `batch`."""
    parts = [gather(canvas, r) for r in regions]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([comfy.utils.repeat_to_batch_size(p, batch) for p in parts])


def auto_window_batch(model, plan, conds, latent_shape, free_memory: float, gradient: bool = False) -> int:
    """Windows per model call for `free_memory` bytes: as many as fit with ComfyUI's own 1.5x margin, from
    ComfyUI's own estimate of one window's model call (twice that with ControlNets). A gradient pass
    keeps its activations for backward and adds the loss's decoder and LPIPS."""
    h, w = max(r.size for r in plan.regions)
    n_conds = sum(c is not None for c in conds)
    shape = [latent_shape[0] * max(n_conds, 1), latent_shape[1], h, w]
    per_window = model.memory_required(shape)
    if any(c is not None and any(d.get("control") is not None for d in c) for c in conds):
        per_window *= 2
    if gradient:
        factor = latent_geometry(model)[0]
        per_window = per_window * _GRADIENT_MEMORY_FACTOR + _LOSS_BYTES_PER_PIXEL * latent_shape[0] * h * w * factor ** 2
    return max(1, math.floor(free_memory / (1.5 * per_window)))


def _automatic_batch(model, plan, conds, x_in, gradient=False) -> int:
    """One window per call on the CPU (larger batches bring no parallelism there and measured slower:
    tests/benchmark_windows.py); on a GPU as many as its free memory holds now (read once per run)."""
    if x_in.device.type == "cpu":
        return 1
    return auto_window_batch(model, plan, conds, x_in.shape, comfy.model_management.get_free_memory(x_in.device),
                             gradient)


# --- per-window conds and ControlNet copies -----------------------------------------------------

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


class WindowConds:
    """Conds cropped to a batch of regions: latents-shaped masks and model conds, area conds intersected,
    per-region prompts, and one chain of ControlNet copies per batch holding the batch's hint crops.
    Crops are made once per region and run; nothing of the user's conds or ControlNets is modified."""

    def __init__(self, plan, model):
        self.plan, self.model = plan, model
        self.canvas_hints = {}    # id(control) -> (control, canvas-sized hint, px per cell)
        self.hint_crops = {}      # (id(control), region) -> (hint crop, extra concat crops)
        self.controls = {}        # (id(control), batch, B) -> (control, chain copy)
        self.texts = {}           # (id(positive entry), region) -> the region's prompt as the model takes it

    def crop(self, cond_list, batch, B, role):
        out = []
        for d in cond_list:
            w = self._crop_one(d, batch, B, role)
            if w is not None:
                out.append(w)
        return out

    def _crop_one(self, d, batch, B, role):
        if "gligen" in d:
            raise ValueError("positive/negative: GLIGEN box conditioning is placed on the whole canvas and "
                             "cannot be split into ControlSync windows; remove the GLIGEN node.")
        regions = [self.plan.regions[i] for i in batch]
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
            prompted = role == "positive" and self.plan.prompts and "area" not in d and d.get("mask") is None
            if prompted and d.get("conditioning_llama3") is not None:
                raise ValueError("plan: per-factor prompts give each factor its own text embedding and pooled vector; "
                                 "this prompt (HiDream) also carries Llama-3 hidden states, which a plan does not hold "
                                 "per factor, so every factor would keep the positive prompt's. Use prompt_mode 'one "
                                 "for all' with HiDream.")
            if prompted:
                w["model_conds"]["c_crossattn"] = self._region_prompt(d, d["model_conds"].get("c_crossattn"), batch, B)
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
        if isinstance(c, comfy.conds.CONDList):
            # reference latents (ReferenceLatent: Flux Kontext, Flux.2, Qwen-Image Edit, Z-Image Omni): one of the
            # canvas latent's size describes the canvas (the image being edited), so each window gets its crop,
            # like a ControlNet hint; any other size (a subject, a style) is given whole to every window
            return c._copy_with([stack_regions(t, regions, B) if torch.is_tensor(t) and tuple(t.shape[-2:]) == self.plan.canvas
                                 else t for t in c.cond])
        return c

    def _region_prompt(self, d, original, batch, B):
        """The regions' own text embeddings in place of the positive prompt's, stacked like the latents."""
        if original is None:
            raise ValueError("plan: per-factor prompts need a model that takes text embeddings (c_crossattn)")
        device, dtype = original.cond.device, original.cond.dtype
        parts = [original._copy_with(self._model_text(d, i, device).to(device, dtype)) for i in batch]
        if len(parts) == 1:
            return parts[0]
        # CONDCrossAttn.concat pads differing token counts the way ComfyUI batches prompts
        stacked = [original._copy_with(comfy.utils.repeat_to_batch_size(p.cond, B)) for p in parts]
        return original._copy_with(stacked[0].concat(stacked[1:]))

    def _model_text(self, d, i, device):
        """Region i's prompt as the model takes a prompt: converted by the model's own extra_conds with the positive
        entry's other settings, as ComfyUI converts the positive prompt (Flux.2 pads every prompt to 512 tokens)."""
        key = (id(d), i)
        if key not in self.texts:
            latent_format = self.model.latent_format
            frames = (1,) if getattr(latent_format, "latent_dimensions", 2) == 3 else ()
            noise = torch.zeros((1, latent_format.latent_channels) + frames + self.plan.regions[i].size, device=device)
            entry = {k: v for k, v in d.items() if k != "model_conds"}
            entry.update(cross_attn=self.plan.prompts[i], model_conds={})
            (converted,) = comfy.samplers.encode_model_conds(self.model.extra_conds, [entry], noise, device, "positive",
                                                             latent_image=noise)
            self.texts[key] = converted["model_conds"]["c_crossattn"].cond
        return self.texts[key]

    def _control_chain(self, control, batch, B):
        """One chain of ControlBase copies per batch of regions, shared by every cond carrying `control`
        (ComfyUI batches cond with uncond only when they carry the same control object)."""
        key = (id(control), batch, B)
        if key not in self.controls:
            chain, node = [], control
            while node is not None:
                copy = node.copy()
                for name in _CONTROL_RUN_STATE:
                    if hasattr(node, name) and getattr(copy, name, None) is None:
                        setattr(copy, name, getattr(node, name))
                crops = [self._hint_crop(node, i) for i in batch]
                hint = crops[0][0] if len(batch) == 1 else torch.cat([comfy.utils.repeat_to_batch_size(c[0], B) for c in crops])
                extra = [torch.cat([comfy.utils.repeat_to_batch_size(c[1][k], B) for c in crops]) if len(batch) > 1
                         else crops[0][1][k] for k in range(len(node.extra_concat_orig))]
                copy.set_cond_hint(hint, strength=node.strength, timestep_percent_range=node.timestep_percent_range,
                                   vae=node.vae, extra_concat=extra)
                chain.append(copy)
                node = node.previous_controlnet
            for a, b in zip(chain, chain[1:]):
                a.set_previous_controlnet(b)
            self.controls[key] = (control, chain[0])
        return self.controls[key][1]

    def _hint_crop(self, control, i):
        key = (id(control), i)
        if key not in self.hint_crops:
            hint, ratio = self._canvas_hint(control)
            region = self.plan.regions[i].scaled(ratio)
            extra = [gather(_resize_like_comfy(e, hint.shape[-2:], control.upscale_algorithm), region)
                     for e in control.extra_concat_orig]
            self.hint_crops[key] = (gather(hint, region), extra)
        return self.hint_crops[key]

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

    def close(self):
        for _, head in self.controls.values():
            head.cleanup()
        self.controls.clear()
        self.hint_crops.clear()
        self.canvas_hints.clear()
        self.texts.clear()


# --- the gradient passes (AnchorSync and Reconstruction) ------------------------------------------

def guided_x0(run, regions, x, timestep, model_options, record=False):
    """The guider's x0-prediction for a batch of regions stacked along dim 0: the guider's own math
    (CFG, DualCFG, PerpNeg, post-CFG functions, ...), with this wrapper evaluating just those regions.
    Differentiable in x when grad is enabled."""
    token = _focus.set(_Focus(run, tuple(regions), record))
    try:
        t = timestep if len(regions) == 1 else timestep.repeat(len(regions))
        if torch.is_grad_enabled() and t.is_inference():
            t = t.clone()  # guidance may compute with sigma and x (RescaleCFG): autograd cannot save inference tensors
        return run.ctx.guider(x, t, model_options=model_options, seed=run.ctx.seed)
    finally:
        _focus.reset(token)


def _gradient_options(model_options):
    """Options for a pass that autograd runs through: ControlNet residuals are added in place
    (h += ctrl) to skip tensors the next block saved for backward; a copy after the skip connection
    keeps the saved tensor intact."""
    options = comfy.model_patcher.create_model_options_clone(model_options)
    patches = options.setdefault("transformer_options", {}).setdefault("patches", {})
    patches["input_block_patch_after_skip"] = list(patches.get("input_block_patch_after_skip", [])) + [_copy_after_skip]
    return options


def _copy_after_skip(h, transformer_options):
    return h.clone()


def sync_moves(run, model, conds, x_in, timestep, model_options, sync, outputs):
    """AnchorSync for this evaluation: every factor's gradient step toward the anchor factor, every
    region's resulting move, and the fold that puts the moves into the denoised outputs. `outputs`:
    the denoising pass's outputs at the unmoved latents (fast mode: the loss looks at them), or None
    (exact mode: the gradient runs through the guider, the ControlNets and the model)."""
    weight, sigma, r = sync
    plan = run.ctx.plan
    fast = outputs is not None
    factors = factor_indices(plan)
    latents = {i: gather(x_in, plan.regions[i]) for i in factors}
    others = [i for i in factors if i != plan.anchor]
    batches = _batches(plan, others, run.gradient_batch_size(model, conds, x_in))
    decode, modules, loss = _loss_path(run, model, x_in)
    if not fast:
        modules = modules + [model.diffusion_model] + _control_modules(conds)
    # the anchor's x0 (recorded: the denoising pass reuses it), and in the fast mode every factor's,
    # through the guider's math on the outputs the denoising pass already has
    x0s = {(plan.anchor,): guided_x0(run, (plan.anchor,), latents[plan.anchor], timestep, model_options, record=True)}
    if fast:
        for batch in batches:
            x0s[batch] = guided_x0(run, batch, torch.cat([latents[i] for i in batch]), timestep, model_options)
    bar = comfy.utils.ProgressBar(len(others))
    kappas = {}
    with differentiable(modules, copy_saved=_adds_in_place(model)):
        anchor_image = lpips_input(decode(x0s[(plan.anchor,)].clone())).detach()
        grad_options = _gradient_options(model_options)

        def gradient(batch, x):
            comfy.model_management.throw_exception_if_processing_interrupted()
            anchor = anchor_image.repeat(len(batch), *([1] * (anchor_image.ndim - 1)))
            if fast:  # grad_{x0} L at the sampler's own x0, times the denoiser's slope along it
                x0 = x0s[batch].clone()
                values, g = window_sync_gradient(x, identity_through(x0), decode, loss, anchor)
                kappa = shrinkage(x0.to(g), x.to(g), g, kappa_bound(run.ctx.parameterisation, sigma))
                kappas.update(zip(batch, kappa.chunk(len(batch))))
                out = values, kappa * g
            else:
                out = window_sync_gradient(x, lambda v: guided_x0(run, batch, v, timestep, grad_options), decode, loss,
                                           anchor)
            bar.update(len(batch))
            return out

        deltas, skipped = sync_deltas({i: latents[i].clone() for i in others}, batches, weight, sigma, gradient,
                                      run.ctx.parameterisation)
    if skipped:
        logging.warning(f"ControlSync AnchorSync: non-finite sync loss or gradient at sigma {sigma:.4g} for "
                        f"window(s) {sorted(skipped)}; they skip this sync step")
    deltas = {i: d.detach() for i, d in deltas.items()}
    deltas[plan.anchor] = torch.zeros_like(latents[plan.anchor])
    shifts = None
    if fast:  # a moved window's prediction, D(x - delta) ~ D(x) - kappa delta
        shifts = region_moves(plan, {i: kappas[i].to(d) * d if i in kappas else torch.zeros_like(d)
                                     for i, d in deltas.items()})
    return _SyncMoves(region_moves(plan, deltas), shifts, r)


@dataclass(frozen=True)
class _SyncMoves:
    """One synced evaluation's moves: per region its latent move and (fast mode) its predicted x0 shift.

    A step with several evaluations (Heun, DPM2, predictor-correctors) continues the step's first one. The
    papers move the windows by delta_i and step from there; merged, the canvas starts from x - Delta. A
    sampler that keeps stepping from the unmoved x follows x(s) = y(s) + g(s) Delta along the moved
    trajectory y(s) when every evaluation at noise level s sees D_eff(x, s) = D(x - g(s) Delta) - r / (1 - r)
    Delta, g(s) = (s - sigma_next) / (sigma - sigma_next): differentiate x = y + g Delta in the probability
    flow ODE dx/ds = (x - D) / s (g - s g' = -r / (1 - r)). At s = sigma that is the fold; at
    s = sigma_next (Heun's second evaluation) the model sees the sampler's own point, and the step ends
    on the moved trajectory (x = y there), which makes Heun's step equal the papers' moved windows followed
    by Heun over the merged denoiser. `canvas_move`, `canvas_shift`: a continuing evaluation's merged
    Delta (folded in full) and predicted shift (fast mode, g times the first evaluation's)."""
    moves: list | None
    shifts: list | None
    r: float
    canvas_move: torch.Tensor | None = None
    canvas_shift: torch.Tensor | None = None

    def folded(self, run, like):
        """(merged move, merged predicted shift or None) that the fold takes."""
        if self.canvas_move is not None:
            return self.canvas_move.to(like), None if self.canvas_shift is None else self.canvas_shift.to(like)
        return (_merged(run, self.moves, like),
                None if self.shifts is None else _merged(run, self.shifts, like))

    def continued(self, run, like, g: float) -> "_SyncMoves":
        """This step's moves for a later evaluation at g(s): the regions evaluated at the canvas moved by
        g Delta (exact mode), or their predictions shifted by g times the merged shift (fast mode)."""
        move, shift = self.folded(run, like)
        if shift is not None:
            return _SyncMoves(None, None, self.r, move, g * shift)
        moves = None if g == 0 else [g * gather(move, r) for r in run.ctx.plan.regions]
        return _SyncMoves(moves, None, self.r, move, None)


def _loss_path(run, model, x_in):
    """(decode, modules autograd runs through, loss) of AnchorSync's perceptual loss."""
    sync = run.ctx.config.sync
    if sync.loss_decoder == "taesd":
        taesd = load_taesd(model.latent_format, x_in.device)
        device, loss_dtype, modules = x_in.device, torch.float32, []
    else:
        vae = sync.vae
        comfy.model_management.load_models_gpu(comfy.model_management.loaded_models(only_currently_used=True) + [vae.patcher])
        # LPIPS in float32 (float64 when the VAE runs in float64: exact gradient checks)
        device, loss_dtype, modules = vae.device, (torch.float64 if vae.vae_dtype == torch.float64 else torch.float32), [vae.first_stage_model]
    loss_net = load_lpips(sync.loss_net, device, loss_dtype)
    with torch.inference_mode(False):
        latent_format = autograd_copy(model.latent_format)

    def decode(x0):
        if sync.loss_downscale > 1:
            k = sync.loss_downscale  # over height and width (one-frame video latents: (B, C, 1, H, W))
            x0 = torch.nn.functional.avg_pool2d(x0, k) if x0.ndim == 4 else torch.nn.functional.avg_pool3d(x0, (1, k, k))
        if sync.loss_decoder == "taesd":  # TAESD reads the model-space latent, as in ComfyUI's previews
            return taesd.decode(x0.float()).to(loss_dtype)
        z = latent_format.process_out(x0).to(sync.vae.device, sync.vae.vae_dtype)
        image = sync.vae.first_stage_model.decode(z)
        return (image[:, :, 0] if image.ndim == 5 else image).to(loss_dtype)  # video VAEs: the one frame

    def loss(image, anchor_image):
        return loss_net(image.to(anchor_image.device), anchor_image, normalize=False)

    return decode, modules, loss


def reconstruction_correction(run, model, conds, x_in, timestep, model_options):
    """DiffCollage's Reconstruction: (w / 2) grad_x ||H x0(x) - y||^2, x0 the merged collage prediction
    through the guider's math (replayed on the outputs this evaluation merged), one region batch's graph at a
    time (sampling/conditional.py's collage_reconstruction)."""
    plan = run.ctx.plan
    if run.ctx.config.focus is not None:  # the latent is the one region itself: its geometry is the latent's
        plan = replace(plan, canvas=tuple(x_in.shape[-2:]), regions=(rect_region(0, 0, *x_in.shape[-2:]),))
    known, mask = (t.to(x_in.device, x_in.dtype) for t in run.known)
    x0 = run.ctx.guider(x_in, timestep, model_options=model_options, seed=run.ctx.seed)
    touching = [i for i, c in enumerate(plan.coefficients) if c != 0 and bool(gather(mask, plan.regions[i]).any())]
    with differentiable([model.diffusion_model] + _control_modules(conds), copy_saved=_adds_in_place(model)):
        options = _gradient_options(model_options)
        # a clone of the latent: what autograd runs on must not be an inference tensor
        return collage_reconstruction(
            plan, x_in.clone(), lambda batch, x: guided_x0(run, batch, x, timestep, options), x0, known, mask,
            run.ctx.config.reconstruction, _batches(plan, touching, run.gradient_batch_size(model, conds, x_in)))


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
def differentiable(modules, copy_saved: bool = False):
    """Autograd inside ComfyUI's inference mode. Weights loaded there are inference tensors, which
    autograd cannot save for backward; while the gradient pass runs, each is replaced by a plain tensor
    aliasing the same memory (no copy), and the user's own tensors are put back afterwards, whatever
    happens. Nothing is swapped outside this block, so ComfyUI may move or patch weights between steps.
    `copy_saved`: keep a copy of every activation autograd saves (see _saved_copy).
    ComfyUI 0.33 runs RoPE (Flux, Qwen-Image, Wan, Lumina/Z-Image, ...) and int8 linears through
    comfy-kitchen kernels that have no backward unless `comfy.model_management.in_training` is set (its own
    training node sets it the same way): set while the gradient pass runs, restored afterwards."""
    swapped, seen = [], set()
    hooks = torch.autograd.graph.saved_tensors_hooks(_saved_copy, _saved_value) if copy_saved else contextlib.nullcontext()
    training = getattr(comfy.model_management, "in_training", None)
    with torch.inference_mode(False), torch.enable_grad(), hooks:
        try:
            if training is not None:
                comfy.model_management.in_training = True
            for module in modules:
                for sub in module.modules():
                    if id(sub) in seen:
                        continue
                    seen.add(id(sub))
                    for store in (sub._parameters, sub._buffers):
                        for name, t in list(store.items()):
                            if t is not None and t.is_inference():
                                alias = _alias(t)
                                store[name] = torch.nn.Parameter(alias, requires_grad=False) if isinstance(t, torch.nn.Parameter) else alias
                                swapped.append((store, name, t))
            yield
        finally:
            if training is not None:
                comfy.model_management.in_training = training
            for store, name, t in reversed(swapped):
                store[name] = t


def _saved_copy(t):
    """Model code written for inference adds in place to activations that autograd saved for backward (Flux's
    single-stream blocks, the ControlNet residuals of Flux, SD3 and Qwen-Image): a copy of each saved activation
    keeps the value the backward pass needs. Weights and constants (no grad) are never modified: kept as is."""
    return t.clone() if t.requires_grad else t


def _saved_value(t):
    return t


def _adds_in_place(model) -> bool:
    """Whether the diffusion model's code may add in place to saved activations. ComfyUI's UNet does so
    only with ControlNet residuals, which the gradient options' copy after the skip connection handles
    without copying every saved activation (half the activation memory)."""
    return not isinstance(model.diffusion_model, comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel)


def autograd_copy(obj):
    """A shallow copy of `obj` whose tensor attributes made in inference mode are plain tensors autograd can
    save (Wan's latent format, used by Qwen-Image, keeps its per-channel mean and std as tensors). Call it
    outside inference mode."""
    out = copy.copy(obj)
    for name, value in vars(obj).items():
        if torch.is_tensor(value) and value.is_inference():
            setattr(out, name, value.clone())
    return out


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor viewing an inference tensor's memory."""
    alias = torch.empty(0, dtype=t.dtype, device=t.device)
    return alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


# --- loss networks and weights on disk -----------------------------------------------------------

_lpips_cache: dict = {}


# where users put the LPIPS backbone files (also settable in extra_model_paths.yaml as `lpips:`)
folder_paths.add_model_folder_path("lpips", os.path.join(folder_paths.models_dir, "lpips"))


def lpips_backbone_path(net: str) -> str:
    """The torchvision ImageNet backbone file LPIPS needs, from ComfyUI's models/lpips or torch's hub cache."""
    return find_backbone(net, list(folder_paths.get_folder_paths("lpips")) + [hub_checkpoints()])


def load_lpips(net: str, device, dtype=torch.float32):
    key = (net, str(device), dtype)
    if key not in _lpips_cache:
        with torch.inference_mode(False):  # usable for gradients whichever mode it is first asked in
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
