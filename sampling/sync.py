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

The fold. ComfyUI's first-order deterministic step from x with denoised D is
    x_next = x + (sigma_next - sigma) (x - D) / sigma = r x + (1 - r) D,   r = sigma_next / sigma,
for every parameterisation (k-diffusion `euler`; ComfyUI's `ddim` is that same Euler step). For "ve"
it is DDIM with eta 0; for "flow" (x - D) / sigma = eps - x0 is the flow's velocity, so it is the
flow's Euler step - the same formula, whatever the schedule's shift (the shift only moves the sigmas).
Stepping each window from its moved latent x - delta_i and merging equals one step from x with
    D_eff = merge_i D_i(x - delta_i) - r / (1 - r) * merge_i delta_i,
so the update folds into the denoised output the sampler sees: exact for euler and ddim in both
parameterisations. The merge is any plan's: sum_i c_i m_i (.) / sum_i c_i m_i, signed DiffCollage
coefficients included, since the step is linear and the coefficients on a cell sum to 1.

Factor graphs. Only factors (windows) are synced toward the anchor factor. A variable (an overlap,
or any intersection of factors) is not compared with the anchor: it is the same cells as the factors
covering them, so it moves with them, cell by cell by the mean of the moves of the factors covering the
cell. This keeps the merge of consistent moves consistent: when the factors' moves agree on every cell
(they are one canvas move Delta), every region moves by Delta on its cells and the merge, whose
coefficients sum to 1 on each cell, moves the canvas by exactly Delta; on a chain, a half overlap between
factors f and g gets delta_f + delta_g - (delta_f + delta_g) / 2 = their average, MultiDiffusion's average
of the moved latents.

The fast mode ("skip model Jacobian"). One model evaluation per window per step: the loss looks at the
x0-prediction the sampler's own denoising pass computed, and its gradient g = grad_{x0} L runs through the
decoder and LPIPS only. The denoiser's Jacobian J, which the exact gradient J^T g runs through, is
replaced by its Rayleigh quotient along g, estimated from that same evaluation: for a denoiser that is
linear along g (the optimal one for Gaussian data, where g is an eigen-direction of J, e.g. a window's
global style), <D(x), g> = <J x, g> = kappa <x, g>, so kappa = <D(x), g> / <x, g>, clamped to the range
an optimal denoiser's eigenvalues take ([0, 1 / alpha]). Then grad_x L ~ kappa g, the move is
delta = w c^2 kappa g, and a moved window's prediction is D(x - delta) ~ D(x) - kappa delta:
    D_eff = merge_i D_i(x) - merge_i kappa_i delta_i - r / (1 - r) * merge_i delta_i.
(The identity, kappa = 1, overshoots wherever the signal's variance along g is small next to sigma^2;
on the analytic test bed's global style kappa is exact, tests/test_testbed.py.)

Schedules. "The first 10 of 50 steps" (the papers) is the first 20% of the noise schedule. On a whole
schedule of N steps it is counted in steps: the first floor(10 N / 50 + 1/2) steps are synced (half up:
5 of 50 at 25 steps is 3), step t with weight w * decay^(t * 50 / N). A run that is part of a longer
schedule counts in that schedule's steps: KSampler's denoise d samples the last N of int(N / d) steps,
so its step i is step int(N / d) - N + i there. When only the sigmas are known and they are not a whole
schedule (split sigmas, a custom schedule), the same part of the noise schedule is measured the way
ComfyUI measures ControlNet start/end percents: a step is synced when its noise level p (0 = pure noise,
1 = clean) is below 10/50, with weight w * decay^(50 p).

Counted from the run (`start` "run", for img2img and upscaling). At KSampler's denoise d the run starts past
the first 1 - d of the noise schedule, so the papers' rule syncs nothing once d <= 1 - 10/50 (img2img at
0.5). Counted from the run, the steps that actually run are taken as the whole schedule: the first
floor(10 N / 50 + 1/2) of the N steps run are synced, decaying per 50-step-equivalent of the run; by noise
level, a step is synced while (p - p0) / (1 - p0) < 10/50, p0 the level of the run's first sigma. The windows
then agree on colour and lighting where an img2img run still changes them: its first, noisiest steps.
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
        schedule: (0, steps)); else the noise-level rule, `level_of(sigma)` giving a sigma's level. With
        `start` "run" the run is counted as a whole schedule of its own (module doc)."""
        steps = len(sigmas) - 1
        if self.weight == 0.0 or steps < 1:
            return [0.0] * max(steps, 0)
        if self.start == "run" and position is not None:
            position = (0, steps)
        elif self.start == "run":
            first, absolute = level_of(sigmas[0]), level_of
            level_of = lambda sigma: (absolute(sigma) - first) / max(1.0 - first, 1e-12)  # noqa: E731
        if position is not None:
            offset, total = position
            return [self.weight_at(offset + i, total) for i in range(steps)]
        weights = []
        for sigma in sigmas[:-1]:
            # noise levels only grow along a schedule: stop looking once past the synced part
            weights.append(self.weight_at_level(level_of(sigma)) if not weights or weights[-1] > 0 else 0.0)
        return weights


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
    """The fast mode's upper clamp on kappa, 1 / alpha: D(x) moves at most as x / alpha does. A flow
    model's first step (sigma 1, alpha 0) predicts x0 from pure noise: no bound."""
    alpha = signal_scale(parameterisation, sigma)
    return 1.0 / alpha if alpha > 0 else float("inf")


def lpips_input(decoded: torch.Tensor) -> torch.Tensor:
    """The reference code's path decoded -> /2 + 0.5 -> clamp(0, 1) -> *2 - 1: a clamp to [-1, 1]
    whose gradient is zero at saturated pixels."""
    return decoded.clamp(-1.0, 1.0)


def window_sync_gradient(x: torch.Tensor, x0_of: Callable, decode: Callable, loss: Callable,
                         anchor_image: torch.Tensor):
    """(per-window loss, grad_x of their sum) for a batch of windows stacked along dim 0.

    x0_of(x) -> the windows' x0-predictions (differentiable in x, or a fixed x0 plus the identity in
    the fast mode); decode(x0) -> images in [-1, 1]; loss(images, anchor) -> one value per window.
    Windows do not interact, so the gradient of the sum is every window's own gradient.
    """
    x = x.detach().requires_grad_(True)
    values = loss(lpips_input(decode(x0_of(x))), anchor_image).flatten()
    (grad,) = torch.autograd.grad(values.sum(), x)
    return values.detach(), grad


def identity_through(x0: torch.Tensor) -> Callable:
    """x0(x) as the given prediction moving one to one with x: the gradient of a loss of it is grad_{x0}."""
    return lambda x: x0.detach() + (x - x.detach())


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


def shrinkage(x0: torch.Tensor, x: torch.Tensor, g: torch.Tensor, high: float = 1.0) -> torch.Tensor:
    """The fast mode's kappa = <D(x), g> / <x, g> per sample (dim 0), clamped to [0, high]: the denoiser's
    Jacobian along g as one evaluation shows it (see the module doc). Shaped to broadcast over a sample."""
    dims = tuple(range(1, x.ndim))
    num, den = (x0 * g).sum(dims), (x * g).sum(dims)
    kappa = torch.where(den.abs() > 0, num / torch.where(den.abs() > 0, den, torch.ones_like(den)),
                        torch.zeros_like(den))
    return kappa.clamp(0.0, high).reshape(-1, *([1] * (x.ndim - 1)))


def fold_update(denoised: torch.Tensor, merged_delta: torch.Tensor, r: float,
                merged_shift: torch.Tensor | None = None) -> torch.Tensor:
    """D_eff = D - shift - r / (1 - r) * delta: the denoised output whose first-order step from the unmoved
    canvas equals the merge of the windows' steps from their moved latents. D is the merge of the moved
    windows' predictions (exact mode, shift 0), or of the unmoved ones with their predicted shifts (fast)."""
    if r >= 1.0:
        raise ValueError(f"sigma_next / sigma = {r} >= 1: the schedule does not decrease")
    out = denoised - (r / (1.0 - r)) * merged_delta
    return out if merged_shift is None else out - merged_shift
