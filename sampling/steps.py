"""Which model evaluation starts which sampler step (plain torch; the sampler is a callable).

AnchorSync moves the windows once per sampler step, at the step's first evaluation. A sampler's
evaluations cannot be told apart by their sigma alone: Heun's second evaluation of step i is made at
exactly sigma_{i+1}, where step i+1 begins too. What every k-diffusion-style sampler does share is
the progress callback: it reports step i right after the evaluation that starts step i (the
`denoised` it reports is that evaluation's). So the sampler is first run once on a stand-in
denoiser that costs nothing - same sigmas, same options, its own random numbers kept apart - and the
evaluations that come right before each callback are the steps' first ones. A sampler whose pattern
depends on the model's outputs (adaptive step sizes) is detected and refused.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch


class StepPatternError(ValueError):
    """The sampler does not take one step per schedule interval with a fixed evaluation pattern."""


def first_evaluations(sampler_function: Callable, model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict,
                      **options) -> list[int]:
    """For each step of `sigmas`, the 0-based number of the model evaluation that starts it, found by
    running `sampler_function` on a stand-in for `model` (attributes are read from the real one)."""
    stand_in = _StandIn(model, extra_args.get("model_options", {}))
    reported = []
    probe_args = dict(extra_args)
    probe_args["model_options"] = dict(extra_args.get("model_options", {}))
    with _own_random_numbers(x.device):
        sampler_function(stand_in, x.clone(), sigmas.clone(), extra_args=probe_args,
                         callback=lambda d: reported.append(len(stand_in.sigmas)), disable=True, **options)
    steps = len(sigmas) - 1
    firsts = [n - 1 for n in reported]
    if len(firsts) != steps or firsts != sorted(set(firsts)) or (firsts and firsts[0] < 0):
        raise StepPatternError(f"the sampler reported {len(reported)} steps for a schedule of {steps}")
    for i, n in enumerate(firsts):
        sigma, start, end = stand_in.sigmas[n], float(sigmas[i]), float(sigmas[i + 1])
        if not (sigma >= start * (1 - 1e-5) and sigma > end):  # sigma_hat >= sigma_i (churn raises it)
            raise StepPatternError(f"step {i} starts at sigma {sigma:.4g}, not at the schedule's {start:.4g}")
    return firsts


class _StandIn:
    """A denoiser that costs nothing (the optimal one for unit Gaussian data), recording the sigma of
    every evaluation. Post-CFG functions the sampler itself installed (CFG++ samplers read the
    uncond prediction through one) are called as CFG would; the user's own are not (they may call
    the real model)."""

    def __init__(self, model, user_options: dict):
        self._model = model
        self._user_post_cfg = {id(f) for f in user_options.get("sampler_post_cfg_function", [])}
        self.sigmas: list[float] = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, x, sigma, model_options=None, **kwargs):
        self.sigmas.append(float(sigma.flatten()[0]))
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        denoised = x / (1 + s * s)
        for fn in (model_options or {}).get("sampler_post_cfg_function", []):
            if id(fn) not in self._user_post_cfg:
                denoised = fn({"denoised": denoised, "cond_denoised": denoised, "uncond_denoised": denoised,
                               "input": x, "sigma": sigma, "cond_scale": 1.0, "cond": None, "uncond": None,
                               "model": None, "model_options": model_options})
        return denoised


@contextlib.contextmanager
def _own_random_numbers(device: torch.device):
    """Samplers that draw noise without a seed use the global generators: keep the real run's draws."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
