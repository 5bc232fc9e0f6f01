"""The SyncDiffusion / ControlSync synchronisation step (plain torch; the model is a callable).

Per synced step, every non-anchor window i moves by one gradient step
    x_i <- x_i - w_t * grad_{x_i} LPIPS(D(x0_i(x_i)), stopgrad(D(x0_anchor)))
before it is denoised; the anchor is decoded once and not moved.

The step in each model's own parameterisation. ComfyUI samples x = alpha x0 + sigma eps, with
    "ve"   (eps, v-prediction, x0 and EDM models): alpha = 1,         x = x0 + sigma eps
    "flow" (CONST: SD3, Flux, Qwen-Image, ...):    alpha = 1 - sigma, x = (1 - sigma) x0 + sigma eps
while the papers step in the variance-preserving latent z = alpha_vp x0 + sigma_vp eps with
alpha_vp^2 + sigma_vp^2 = 1. Dividing by the norm c = sqrt(alpha^2 + sigma^2) maps one onto the
other: z = x / c (for "ve" this is the DDPM latent, sigma^2 = (1 - a) / a). Since x = c z,
grad_z L = c grad_x L, and the paper's step z <- z - w grad_z L is, multiplied by c,
    x <- x - w c^2 grad_x L,   c^2 = alpha^2 + sigma^2:   1 + sigma^2 ("ve"), (1 - sigma)^2 + sigma^2 ("flow"),
so a weight of 20 means the paper's 20 in every family (`step_scale`). sigma is the sampler's own
sigma (after any shift of the schedule, as SD3 and Flux use): the map is pointwise in sigma.

Moving the sampler. The papers move every window, denoise it from its moved latent, and step from there.
Merged, the canvas starts the step from x - Delta, Delta = merge_i delta_i (the plan's merge of the windows'
moves: MultiDiffusion's average, or DiffCollage's signed coefficients, which sum to 1 on every cell), and the
sampler steps with the merge of the windows' predictions at their moved latents. The pack does exactly that:
at a synced step's first evaluation it returns merge_i D_i(x_i - delta_i) and moves the sampler's own x by
Delta in place, so whatever the sampler computes next - an Euler, ancestral or SDE update, LCM's x = D, a
multistep history, Heun's second evaluation - starts from the moved x (`canvas_move`; which samplers step
from the tensor they evaluate: sampling/steps.py).

Factor graphs. Only factors (windows) are synced toward the anchor factor. A variable (an overlap,
or any intersection of factors) is not compared with the anchor: it is the same cells as the factors
covering them, so it moves with them, cell by cell by the mean of the moves of the factors covering the
cell. This keeps the merge of consistent moves consistent: when the factors' moves agree on every cell
(they are one canvas move Delta), every region moves by Delta on its cells and the merge, whose
coefficients sum to 1 on each cell, moves the canvas by exactly Delta; on a chain, a half overlap between
factors f and g gets delta_f + delta_g - (delta_f + delta_g) / 2 = their average, MultiDiffusion's average
of the moved latents.

The fast mode ("skip model Jacobian"). No backward pass through the model: the loss looks at the
x0-prediction the sampler's own denoising pass computed, and its gradient g = grad_{x0} L runs through the
decoder and LPIPS only. The exact gradient is J^T g, J the denoiser's Jacobian; the fast mode replaces J by
its slope along g, kappa = <J u, u> / <u, u> with u = w c^2 g (the move at kappa = 1), measured by one more
forward evaluation at x - u: J u ~ D(x) - D(x - u) (`jacobian_slope`). The window moves by delta = kappa u
and its prediction there is D(x) - kappa (D(x) - D(x - u)). For an affine denoiser D(x) = A x + b - the
optimal one for Gaussian data with any mean, a window's global style being one such direction - both are
exact along u; the denoiser's data mean b drops out of the difference. kappa is clamped to [0, 1 / alpha],
the range an optimal denoiser's slope takes, and is 0 where alpha = 0 (a flow model at sigma 1, where x
carries nothing of x0).

Schedules. "The first 10 of 50 steps" (the papers) is the first 20% of the noise schedule. On a whole
schedule of N steps it is counted in steps: the first floor(10 N / 50 + 1/2) steps are synced (half up:
5 of 50 at 25 steps is 3), step t with weight w * decay^(t * 50 / N). A run that is part of a longer
schedule counts in that schedule's steps: KSampler's denoise d samples the last N of int(N / d) steps,
so its step i is step int(N / d) - N + i there; sigmas split with SplitSigmas, or cut by a scheduler's
denoise, are found in the whole schedule they came from (`locate`) and counted there. Custom sigmas that
start from pure noise - their first step within the first 1/N of the noise range, as the papers' own DDIM
timesteps 981, 961, ..., 1 do - are a whole schedule of their own N steps. Any other sigmas are measured
the way ComfyUI measures ControlNet start/end percents: a step is synced when its noise level p (0 = pure
noise, 1 = clean) is below 10/50, with weight w * decay^(50 p).

Counted from the run (`start` "run", for img2img and upscaling). At KSampler's denoise d the run starts past
the first 1 - d of the noise schedule, so the papers' rule syncs nothing once d <= 1 - 10/50 (img2img at
0.5). Counted from the run, the N steps that actually run - whatever sigmas they are - are a whole schedule
of their own: the first floor(10 N / 50 + 1/2) are synced, step t with weight w * decay^(t * 50 / N). The
windows then agree on colour and lighting where an img2img run still changes them: its first, noisiest steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .merge import gather, scatter_add
from .plans import RegionPlan

LOSS_NETS = ("vgg", "alex")
SYNC_STARTS = ("schedule", "run")


@dataclass(frozen=True)
class SyncSchedule:
    """w_t = weight * decay^t for the first `steps` of a `reference_steps`-step schedule (the papers:
    20, 0.95, 10 of 50); see the module doc for other step counts and partial schedules. `start`: counted
    from the start of the whole noise schedule ("schedule", the papers) or of the steps that run ("run")."""
    weight: float = 20.0
    decay: float = 0.95
    steps: int = 10
    reference_steps: int = 50
    start: str = "schedule"

    def __post_init__(self):
        if self.start not in SYNC_STARTS:
            raise ValueError(f"sync start must be one of {SYNC_STARTS}, got {self.start!r}")

    @property
    def fraction(self) -> float:
        return self.steps / self.reference_steps

    def synced_steps(self, total: int) -> int:
        return math.floor(self.steps * total / self.reference_steps + 0.5)

    def weight_at(self, index: int, total: int) -> float:
        """Step `index` of a full schedule of `total` steps."""
        if index < 0 or index >= self.synced_steps(total):
            return 0.0
        return self.weight * self.decay ** (index * self.reference_steps / total)

    def weight_at_level(self, level: float) -> float:
        """A step starting at noise level `level` (0 = pure noise, 1 = clean) of a partial schedule."""
        if level >= self.fraction - 1e-9:
            return 0.0
        return self.weight * self.decay ** (self.reference_steps * max(level, 0.0))

    def step_weights(self, sigmas: list[float], level_of: Callable[[float], float],
                     position: tuple[int, int] | None = None) -> list[float]:
        """w_t for every step of the schedule `sigmas` (ending with the final sigma). `position`:
        (offset, total) when the schedule is steps offset .. of a known `total`-step schedule (a whole
        schedule: (0, steps)); else custom sigmas starting from pure noise count as a whole schedule, and
        any others go by the noise-level rule, `level_of(sigma)` giving a sigma's level. With `start` "run"
        the steps given are a whole schedule of their own (module doc)."""
        steps = len(sigmas) - 1
        if self.weight == 0.0 or steps < 1:
            return [0.0] * max(steps, 0)
        if self.start == "run" or (position is None and level_of(sigmas[0]) < 1.0 / steps):
            position = (0, steps)
        if position is not None:
            offset, total = position
            return [self.weight_at(offset + i, total) for i in range(steps)]
        weights = []
        for sigma in sigmas[:-1]:
            # noise levels only grow along a schedule: stop looking once past the synced part
            weights.append(self.weight_at_level(level_of(sigma)) if not weights or weights[-1] > 0 else 0.0)
        return weights


def locate(sigmas: list[float], whole_schedules) -> tuple[int, int] | None:
    """(offset, total) when `sigmas` are consecutive points of one of `whole_schedules` (an iterable of
    schedules, each a list of its total + 1 sigmas): a schedule split with SplitSigmas, or KSampler's
    denoise, finds the whole schedule it came from. Compared to float32 rounding; None if none holds it."""
    n = len(sigmas)
    for whole in whole_schedules:
        total = len(whole) - 1
        for offset in range(total - n + 2):
            if all(same_sigma(a, b) for a, b in zip(whole[offset:offset + n], sigmas)):
                return offset, total
    return None


def same_sigma(a: float, b: float) -> bool:
    """Two sigmas equal within float32 rounding of a schedule computed twice."""
    return abs(a - b) <= 1e-5 * max(abs(a), abs(b)) + 1e-8


def noise_level(sigma: float, percent_to_sigma: Callable[[float], float]) -> float:
    """The p in [0, 1] with percent_to_sigma(p) = sigma (a model's decreasing map, as ComfyUI's
    `model_sampling.percent_to_sigma`), by bisection."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if percent_to_sigma(mid) > sigma:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


PARAMETERISATIONS = ("ve", "flow")


def step_scale(parameterisation: str, sigma: float) -> float:
    """alpha^2 + sigma^2: the paper's variance-preserving step size in the sampler's space (see module doc)."""
    sigma = float(sigma)
    if parameterisation == "ve":
        return 1.0 + sigma ** 2
    if parameterisation == "flow":
        return (1.0 - sigma) ** 2 + sigma ** 2
    raise ValueError(f"unknown parameterisation {parameterisation!r}; known: {', '.join(PARAMETERISATIONS)}")


def signal_scale(parameterisation: str, sigma: float) -> float:
    """alpha in x = alpha x0 + sigma eps: 1 ("ve"), 1 - sigma ("flow")."""
    return 1.0 - float(sigma) if parameterisation == "flow" else 1.0


def kappa_bound(parameterisation: str, sigma: float) -> float:
    """The fast mode's upper clamp on kappa, 1 / alpha: an optimal denoiser's slope along any direction,
    alpha lambda / (alpha^2 lambda + sigma^2) for data variance lambda, stays below it; where alpha = 0 (a
    flow model at sigma 1) the input carries nothing of x0 and the slope is 0."""
    alpha = signal_scale(parameterisation, sigma)
    return 1.0 / alpha if alpha > 0 else 0.0


def lpips_input(decoded: torch.Tensor) -> torch.Tensor:
    """The reference code's path decoded -> /2 + 0.5 -> clamp(0, 1) -> *2 - 1: a clamp to [-1, 1]
    whose gradient is zero at saturated pixels."""
    return decoded.clamp(-1.0, 1.0)


def window_sync_gradient(x: torch.Tensor, x0_of: Callable, decode: Callable, loss: Callable,
                         anchor_image: torch.Tensor):
    """(per-window loss, grad_x of their sum) for a batch of windows stacked along dim 0.

    x0_of(x) -> the windows' x0-predictions, differentiable in x (the fast mode passes x0 itself as x and
    the identity: its gradient is grad_{x0}); decode(x0) -> images in [-1, 1]; loss(images, anchor) -> one value per window.
    Windows do not interact, so the gradient of the sum is every window's own gradient.
    """
    x = x.detach().requires_grad_(True)
    values = loss(lpips_input(decode(x0_of(x))), anchor_image).flatten()
    (grad,) = torch.autograd.grad(values.sum(), x)
    return values.detach(), grad


def sync_deltas(latents: dict[int, torch.Tensor], batches: list[tuple[int, ...]], weight: float, sigma: float,
                gradient: Callable[[tuple, torch.Tensor], tuple], parameterisation: str = "ve"
                ) -> tuple[dict[int, torch.Tensor], list[int]]:
    """delta_i = w_t * step_scale(parameterisation, sigma) * grad_i for every window in `batches` (each batch
    one gradient graph, windows stacked along dim 0 as `latents` are: (B, C, h, w) each). A window whose loss
    or gradient is not finite gets no update; its index is returned so the caller can warn."""
    scale = weight * step_scale(parameterisation, sigma)
    deltas, skipped = {}, []
    for batch in batches:
        values, grad = gradient(batch, torch.cat([latents[i] for i in batch]))
        per_window = grad.chunk(len(batch))
        per_value = values.chunk(len(batch))
        for i, g, v in zip(batch, per_window, per_value):
            if bool(torch.isfinite(v).all()) and bool(torch.isfinite(g).all()):
                deltas[i] = (scale * g).to(latents[i].dtype)
            else:
                skipped.append(i)
                deltas[i] = torch.zeros_like(latents[i])
    return deltas, skipped


def factor_indices(plan: RegionPlan) -> list[int]:
    """The regions that are factors (windows), synced toward the anchor; the rest are variables."""
    if not plan.factors_of:
        return list(range(len(plan.regions)))
    return [i for i, f in enumerate(plan.factors_of) if f == (i,)]


def region_moves(plan: RegionPlan, factor_moves: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    """Every region's move: a factor its own; any other region, cell by cell, the mean of the moves of
    the factors covering that cell (see the module doc)."""
    like = next(iter(factor_moves.values()))
    total = like.new_zeros(like.shape[:-2] + plan.canvas)
    count = like.new_zeros(plan.canvas)
    for f, move in factor_moves.items():
        scatter_add(total, plan.regions[f], move)
        scatter_add(count, plan.regions[f], torch.ones(move.shape[-2:], dtype=count.dtype, device=count.device))
    mean = total / count.clamp_min(1)
    return [factor_moves[i] if i in factor_moves else gather(mean, region) for i, region in enumerate(plan.regions)]


def jacobian_slope(d_at_x: torch.Tensor, d_at_probe: torch.Tensor, u: torch.Tensor, high: float) -> torch.Tensor:
    """The fast mode's kappa = <D(x) - D(x - u), u> / <u, u> per sample (dim 0), clamped to [0, high]: the
    denoiser's slope along u from one forward difference (see the module doc). Shaped to broadcast over a
    sample; 0 for a sample whose u is 0."""
    dims = tuple(range(1, u.ndim))
    num, den = ((d_at_x - d_at_probe) * u).sum(dims), (u * u).sum(dims)
    kappa = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
    return kappa.clamp(0.0, high).reshape(-1, *([1] * (u.ndim - 1)))
