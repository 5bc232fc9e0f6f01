"""Which model evaluation starts which sampler step, and whether moving it moves the sampler (plain torch;
the sampler is a callable).

AnchorSync moves the windows once per sampler step, at the step's first evaluation. A sampler's
evaluations cannot be told apart by their sigma alone: Heun's second evaluation of step i is made at
exactly sigma_{i+1}, where step i+1 begins too. What every k-diffusion-style sampler does share is
the progress callback: it reports step i right after the evaluation that starts step i (the
`denoised` it reports is that evaluation's). So the sampler is first run once on a stand-in
denoiser that costs nothing - same sigmas, same options, its own random numbers kept apart - and the
evaluations that come right before each callback are the steps' first ones. A sampler whose pattern
depends on the model's outputs (adaptive step sizes) is detected and refused.

The papers move x_t, then step. The pack moves the tensor the sampler evaluates, in place, and lets the
sampler step: that is the papers' algorithm exactly when that tensor is the sampler's state - what its
next steps read. The stand-in runs tell (`moves_the_state`): with a stand-in whose prediction ignores
its input, a nudge of the evaluated tensor made after the evaluation either changes what the sampler
returns (the tensor is its state), or nothing the sampler returns depends on the state at that step at
all (LCM: x_next = D + noise; moving x is then moving nothing, and the step from the moved x is the
same), or the sampler keeps its state elsewhere - UniPC evaluates a rescaled copy, SA-Solver's corrector
steps from its previous corrected state - and moving the evaluated tensor would not be the papers' move.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable

import torch


class StepPatternError(ValueError):
    """The sampler does not take one step per schedule interval with a fixed evaluation pattern."""


class StateNotReachable(ValueError):
    """The tensor the sampler evaluates is not its state: moving it would not move the sampler."""


def first_evaluations(sampler_function: Callable, model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict,
                      **options) -> list[int]:
    """For each step of `sigmas`, the 0-based number of the model evaluation that starts it, found by
    running `sampler_function` on a stand-in for `model` (attributes are read from the real one)."""
    stand_in = _StandIn(model, extra_args.get("model_options", {}))
    reported = []
    _run(sampler_function, stand_in, x, sigmas, extra_args, lambda d: reported.append(len(stand_in.sigmas)), options)
    steps = len(sigmas) - 1
    firsts = [n - 1 for n in reported]
    if len(firsts) != steps or firsts != sorted(set(firsts)) or (firsts and firsts[0] < 0):
        raise StepPatternError(f"the sampler reported {len(reported)} steps for a schedule of {steps}")
    for i, n in enumerate(firsts):
        sigma, start, end = stand_in.sigmas[n], float(sigmas[i]), float(sigmas[i + 1])
        # sigma_hat >= sigma_i (churn raises it); flow models' SDE samplers start a hair below 1
        # (k-diffusion's offset_first_sigma_for_snr): within a hundredth of the step
        if not (sigma >= start - 1e-2 * (start - end) and sigma > end):
            raise StepPatternError(f"step {i} starts at sigma {sigma:.4g}, not at the schedule's {start:.4g}")
    return firsts


def moves_the_state(sampler_function: Callable, model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict,
                    firsts: list[int], steps: list[int], **options) -> None:
    """Raise StateNotReachable unless, at every step in `steps`, moving the tensor the sampler evaluates at
    the step's first evaluation (`firsts`) is moving the sampler's state (see the module doc). Run on
    stand-ins whose prediction ignores the input: the tensor must still be held when the sampler reports the
    step (not a temporary, like UniPC's rescaled copy), and nudging it after the evaluation must change what
    the sampler returns, unless the sampler's result does not depend on its state at all (LCM)."""
    def trajectory(nudge_at=None, start=x, held=None):
        """Every later evaluation's input and the result: what the sampler does from the step on."""
        stand_in = _StandIn(model, extra_args.get("model_options", {}), constant=True, nudge_at=nudge_at)
        callback = None if held is None else (lambda d: held.append(stand_in.evaluated[-1]() is not None))
        out = _run(sampler_function, stand_in, start, sigmas, extra_args, callback, options)
        return stand_in.inputs + [out]

    held = []
    plain = trajectory(held=held)
    for step in steps:
        if not held[step]:
            raise StateNotReachable(f"at step {step} it evaluates a temporary copy of its state")
    carries_state = not _same(trajectory(start=x + 0.5 * x.std().clamp_min(1.0))[1:], plain[1:])
    for step in steps:
        if carries_state and _same(trajectory(nudge_at=firsts[step])[firsts[step] + 1:], plain[firsts[step] + 1:]):
            raise StateNotReachable(f"at step {step} it does not step from the tensor it evaluates")


def _same(a: list, b: list) -> bool:
    return all(bool(((u - v).abs() <= 1e-6 * (1.0 + v.abs())).all()) for u, v in zip(a, b))


def _run(sampler_function, stand_in, x, sigmas, extra_args, callback, options):
    probe_args = dict(extra_args)
    probe_args["model_options"] = dict(extra_args.get("model_options", {}))
    with _own_random_numbers(x.device):
        return sampler_function(stand_in, x.clone(), sigmas.clone(), extra_args=probe_args,
                                callback=callback, disable=True, **options)


class _StandIn:
    """A denoiser that costs nothing, recording the sigma of every evaluation: the optimal one for unit
    Gaussian data, or (`constant`) one whose prediction ignores its input, nudging the tensor it
    evaluated in place after evaluation number `nudge_at`. Post-CFG functions the sampler itself
    installed (CFG++ samplers read the uncond prediction through one) are called as CFG would; the user's
    own are not (they may call the real model)."""

    def __init__(self, model, user_options: dict, constant: bool = False, nudge_at: int | None = None):
        self._model = model
        self._user_post_cfg = {id(f) for f in user_options.get("sampler_post_cfg_function", [])}
        self._constant, self._nudge_at = constant, nudge_at
        self.sigmas: list[float] = []
        self.evaluated: list = []  # a weak reference to every tensor evaluated
        self.inputs: list = []     # and its value (constant stand-ins)

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, x, sigma, model_options=None, **kwargs):
        self.sigmas.append(float(sigma.flatten()[0]))
        self.evaluated.append(weakref.ref(x))
        if self._constant:
            self.inputs.append(x.clone())
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        denoised = torch.full_like(x, 0.25) if self._constant else x / (1 + s * s)
        for fn in (model_options or {}).get("sampler_post_cfg_function", []):
            if id(fn) not in self._user_post_cfg:
                denoised = fn({"denoised": denoised, "cond_denoised": denoised, "uncond_denoised": denoised,
                               "input": x, "sigma": sigma, "cond_scale": 1.0, "cond": None, "uncond": None,
                               "model": None, "model_options": model_options})
        if self._nudge_at == len(self.sigmas) - 1:
            x.add_(0.5 * (1.0 + x.abs().max()))
        return denoised


@contextlib.contextmanager
def _own_random_numbers(device: torch.device):
    """Samplers that draw noise without a seed use the global generators: keep the real run's draws."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield
