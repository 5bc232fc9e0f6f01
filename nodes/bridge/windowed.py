"""A clone of the user's MODEL whose sampling runs a plan's windows: an OUTER_SAMPLE wrapper that sets up each
run, and the CALC_COND_BATCH wrapper (passes.py) that does the windows. Nothing is patched globally and
nothing mutable is stored in model_options."""
from __future__ import annotations

import functools

import comfy.patcher_extension

from . import observations
from .config import GuideSettings, SyncSettings, WindowedConfig
from .model_facts import parameterisation, refuse_for_sync, refuse_unsupported
from .passes import calc_cond_batch
from .positions import check_model
from .run import RunState, current_run, run_context
from .steps import counted_sampler

WRAPPER_KEY = "controlsync.windows"


def windowed_model(model, plan, window_batch: int = 0, sync: SyncSettings | None = None, focus=None,
                   schedule_position=None, guide: GuideSettings | None = None):
    """A clone of `model` whose sampling runs the plan's windows; `model` itself is untouched.
    `schedule_position`: (offset, total) when the caller knows the run samples steps offset.. of a
    total-step schedule (KSampler's denoise), for AnchorSync's step count. `guide`: the Low-pass Guide."""
    refuse_unsupported(model.model_options)
    check_model(plan, model)
    if sync is not None:
        parameterisation(model)  # refuse an unknown parameterisation before sampling starts
        refuse_for_sync(model.model_options)
    if model.get_wrappers(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY):
        raise ValueError("model: this MODEL already carries a ControlSync window plan (from ControlSync Windowed "
                         "Model); connect the original MODEL instead of windowing it twice.")
    config = WindowedConfig(plan, int(window_batch), sync, focus, schedule_position, guide)
    clone = model.clone()
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY,
                               functools.partial(_outer_sample, config))
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, WRAPPER_KEY,
                               functools.partial(calc_cond_batch, config))
    return clone


def _outer_sample(config, executor, noise, latent_image, sampler, sigmas, denoise_mask=None, *args, **kwargs):
    guider = executor.class_obj
    patcher = guider.model_patcher
    refuse_unsupported(guider.model_options)
    ctx = run_context(config, guider, noise.shape, sigmas, kwargs.get("seed", args[2] if len(args) > 2 else None))
    if ctx.synced:
        refuse_for_sync(guider.model_options)
    # known pixels kept by Reconstruction (sampled without ComfyUI's noise mask), the Low-pass Guide
    observed, denoise_mask = observations.build(config, patcher, noise.shape, latent_image.to(noise.device),
                                                denoise_mask)
    run = RunState(ctx)
    run.observations = observed
    sampler = counted_sampler(sampler, run)
    token = current_run.set(run)
    try:
        return executor(noise, latent_image, sampler, sigmas, denoise_mask, *args, **kwargs)
    except BaseException:
        # ComfyUI resets the user's ControlNets (pre-run state, cached hints) only after a successful
        # run; on errors and Cancel we do it too, so they are left exactly as before the run.
        _cleanup_controls(getattr(guider, "conds", None))
        raise
    finally:
        current_run.reset(token)
        run.close()


def _cleanup_controls(conds) -> None:
    seen = set()
    for cond_list in (conds or {}).values():
        for d in cond_list:
            control = d.get("control")
            if control is not None and id(control) not in seen:
                seen.add(id(control))
                control.cleanup()
