"""Step tracking: the sampler's model evaluations counted, each step's first one found beforehand, and the
canvas move of a synced evaluation applied to the sampler's own x (sampling/steps.py has the probes)."""
from __future__ import annotations

import copy
import functools

import comfy.samplers

from ...sampling.steps import StateNotReachable, StepPatternError, first_evaluations, moves_the_state

# a probe latent this small tells a sampler's pattern as well as the canvas would, at no cost
_PROBE_CELLS = 8


def counted_sampler(sampler, run):
    """The same sampler (a copy: a KSAMPLER subclass keeps its own sample()) whose sampler function counts
    model evaluations; when AnchorSync runs, each step's first evaluation is found beforehand, so the
    windows move exactly once per step, and the merged move is applied to the sampler's x in place."""
    if not isinstance(sampler, comfy.samplers.KSAMPLER):
        if run.ctx.synced:
            raise ValueError(f"sync: AnchorSync needs one of ComfyUI's KSAMPLER samplers to find each step's first "
                             f"model evaluation; this sampler is a {type(sampler).__name__}. Use a KSampler sampler "
                             f"or disconnect sync.")
        return sampler
    counted = copy.copy(sampler)
    counted.sampler_function = functools.partial(_counted_sampling, sampler.sampler_function, run)
    return counted


def _counted_sampling(sampler_function, run, model, x, sigmas, extra_args=None, callback=None, disable=None, *args,
                      **options):
    """k-diffusion's sampler signature (model, x, sigmas, extra_args, callback, disable, ...), by position or name."""
    extra_args = {} if extra_args is None else extra_args
    # the name users picked: k-diffusion's sample_<name>, or ComfyUI's <name>_function (dpm_fast, dpm_adaptive)
    name = getattr(sampler_function, "__name__", type(sampler_function).__name__).removeprefix("sample_").removesuffix("_function")
    firsts = None
    if run.ctx.synced:
        firsts = _synced_steps(sampler_function, name, run, model, x, sigmas, extra_args, options)
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

    return sampler_function(_CountedModel(model, run), x, sigmas, extra_args, counted_callback, disable, *args,
                            **options)


def _synced_steps(sampler_function, name, run, model, x, sigmas, extra_args, options) -> list[int]:
    """Each step's first evaluation, after checking on stand-ins that the synced steps' moves reach the
    sampler's state."""
    probe_x = x[..., :_PROBE_CELLS, :_PROBE_CELLS]
    try:
        firsts = first_evaluations(sampler_function, model, probe_x, sigmas, extra_args, **options)
        synced = [i for i, w in enumerate(run.ctx.step_weights) if w > 0 and float(sigmas[i + 1]) > 0]
        moves_the_state(sampler_function, model, probe_x, sigmas, extra_args, firsts, synced, **options)
    except StepPatternError as e:
        raise ValueError(f"sync: the sampler '{name}' does not take one step per point of the schedule ({e}); "
                         f"AnchorSync needs a fixed-step sampler (euler, ddim, dpmpp_2m, ...): choose another "
                         f"sampler or disconnect sync") from None
    except StateNotReachable as e:
        raise ValueError(f"sync: the sampler '{name}' keeps its state apart from the latent it evaluates ({e}), so "
                         f"AnchorSync cannot move it as the papers do; choose another sampler (euler, ddim, dpmpp_2m, "
                         f"deis, ...) or disconnect sync") from None
    return firsts


class _CountedModel:
    """The model the sampler function calls: counts evaluations, and after a synced evaluation moves the
    tensor the sampler evaluated - its state (sampling/steps.py) - by the canvas move, in place."""

    def __init__(self, model, run):
        self._model, self._run = model, run

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, x, *args, **kwargs):
        self._run.evaluations += 1
        self._run.pending_move = None
        out = self._model(x, *args, **kwargs)
        move, self._run.pending_move = self._run.pending_move, None
        if move is not None:
            x.sub_(move.to(x))
        return out
