"""An analytic test bed: worlds whose exact denoisers are known, sampled with the pack's own merge and
sync functions (the model, decoder and perceptual loss are plain callables here).

"Global style" world: a canvas of L cells, x0 = mu + s + d with a data mean mu (real latents have channel
means), one style s ~ N(0, tau^2) shared by every cell and independent local detail d ~ N(0, delta^2 I).
Every window is Gaussian, so its exact denoiser is affine: for x = alpha x0 + sigma eps (alpha = 1 for "ve",
1 - sigma for "flow"), D(x) = mu + alpha Sigma_w (alpha^2 Sigma_w + sigma^2 I)^-1 (x - alpha mu). Truth: the
style is the same in every window, so the spread of the windows' means across a sample is only the detail's,
about delta / sqrt(window).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .conditional import project, reconstruct, reconstruction_correction
from .merge import gather, merge
from .plans import RegionPlan
from .sync import SyncSchedule, jacobian_slope, kappa_bound, signal_scale, sync_deltas, window_sync_gradient


@dataclass(frozen=True)
class GlobalStyleWorld:
    length: int = 48
    tau: float = 1.0     # style std (shared by all cells)
    delta: float = 0.3   # local detail std
    mean: float = 0.0    # the data mean mu
    parameterisation: str = "ve"  # x = x0 + sigma eps ("ve") or (1 - sigma) x0 + sigma eps ("flow")

    def covariance(self, n: int) -> torch.Tensor:
        return self.tau ** 2 * torch.ones(n, n, dtype=torch.float64) + self.delta ** 2 * torch.eye(n, dtype=torch.float64)

    def denoiser(self, n: int):
        cov = self.covariance(n)
        eye = torch.eye(n, dtype=torch.float64)

        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            """x: (..., n) -> E[x0 | x] under x0 ~ N(mu, cov)."""
            alpha = signal_scale(self.parameterisation, sigma)
            gain = alpha * torch.linalg.solve(alpha ** 2 * cov + sigma ** 2 * eye, cov)  # symmetric
            return self.mean + (x - alpha * self.mean) @ gain
        return denoise

    def schedule(self, steps: int) -> torch.Tensor:
        if self.parameterisation == "flow":  # from pure noise (sigma 1) to clean
            sigmas = torch.linspace(1.0, 1e-3, steps, dtype=torch.float64)
            return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])
        return schedule(steps)

    def noise(self, sigma: float, shape, generator) -> torch.Tensor:
        """The starting latent at the schedule's first sigma."""
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * sigma


def _as_canvas(x: torch.Tensor) -> torch.Tensor:
    return x[:, None, None, :]  # (N, L) -> (N, 1, 1, L): the pack's (B, C, H, W) layout


def schedule(steps: int, sigma_max: float = 40.0, sigma_min: float = 2e-3) -> torch.Tensor:
    sigmas = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64))
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def window_denoiser(world: GlobalStyleWorld, plan: RegionPlan):
    """Every region's exact denoiser (windows, factors and their overlaps alike: each is the marginal
    of its own cells), on the region's cells gathered from the canvas."""
    exact = {w: world.denoiser(w) for w in {r.size[1] for r in plan.regions}}

    def denoise(i: int, x_window: torch.Tensor, sigma: float) -> torch.Tensor:
        return _as_canvas(exact[x_window.shape[-1]](x_window[:, 0, 0, :], sigma))
    return denoise


def sample(world: GlobalStyleWorld, plan: RegionPlan, n: int, steps: int = 60, sync: SyncSchedule | None = None,
           seed: int = 0, fast: bool = False) -> torch.Tensor:
    """n canvases sampled with Euler steps where every step merges the windows' exact predictions with
    the pack's `merge`; with `sync`, each window first takes the pack's sync step, the loss being the
    squared difference of the window's and the anchor's mean x0 (this world's "style"), and the canvas steps
    from the moved windows. `fast`: the sync's fast mode (no gradient through the denoiser: its slope along the
    move from one forward difference)."""
    sigmas = world.schedule(steps)
    g = torch.Generator().manual_seed(seed)
    x = _as_canvas(world.noise(float(sigmas[0]), (n, world.length), g))
    denoise = window_denoiser(world, plan)

    def style_loss(image, anchor_image):
        return ((image.mean(dim=(-1, -2, -3)) - anchor_image.mean(dim=(-1, -2, -3))) ** 2)

    for k in range(steps):
        sigma = float(sigmas[k])
        windows = [gather(x, region) for region in plan.regions]
        weight = sync.weight_at(k, steps) if sync is not None else 0.0
        predictions = [denoise(i, w, sigma) for i, w in enumerate(windows)]
        if sync is not None:  # the sync code runs whenever sync is given, also at w_t = 0 (then it must not move)
            anchor_image = predictions[plan.anchor]
            others = [i for i in range(len(windows)) if i != plan.anchor]

            def gradient(batch, xw, sigma=sigma, anchor_image=anchor_image):
                (i,) = batch
                if not fast:
                    return window_sync_gradient(xw, lambda v: denoise(i, v, sigma), lambda x0: x0, style_loss, anchor_image)
                return window_sync_gradient(predictions[i], lambda v: v, lambda x0: x0, style_loss, anchor_image)
            with torch.enable_grad():
                moved, _ = sync_deltas({i: windows[i] for i in others}, [(i,) for i in others], weight, sigma, gradient,
                                       world.parameterisation)
            deltas = [moved.get(i, torch.zeros_like(w)) for i, w in enumerate(windows)]
            if fast:  # the slope along the move at slope 1 from one forward difference
                for i in others:
                    probe = denoise(i, windows[i] - deltas[i], sigma)
                    kappa = jacobian_slope(predictions[i], probe, deltas[i], kappa_bound(world.parameterisation, sigma))
                    predictions[i] = predictions[i] - kappa * (predictions[i] - probe)
                    deltas[i] = kappa * deltas[i]
            else:
                predictions = [denoise(i, w - d, sigma) for i, (w, d) in enumerate(zip(windows, deltas))]
            x = x - merge(plan, deltas)  # the papers: the canvas of moved windows steps
        predicted = merge(plan, predictions)
        x = x + (sigmas[k + 1] - sigmas[k]) * (x - predicted) / sigmas[k]
    return x[:, 0, 0, :]


def sample_conditional(world: GlobalStyleWorld, plan: RegionPlan, observation, y: torch.Tensor, method: str,
                       weight: float = 1.0, steps: int = 60, seed: int = 0, noised_known: bool = False):
    """Euler sampling of canvases (len(y) of them) conditioned on y = H x0 (y: (N, m), H = `observation` on the
    (N, 1, 1, L) canvas), jointly over the plan's regions: "replacement" (Algorithm 4: the merged x0-prediction
    projected, H^+ y + (I - H^+ H) x0), "reconstruction" (Reconstruction per region, each by its own masked
    residual: `Masking` only), "collage_reconstruction" (Reconstruction of the merged x0, `reconstruct`);
    anything else: no guidance. `noised_known`: after each step also x <- x + H^+ (y + sigma_next H eps - H x),
    for a mask x_t on the known cells set to y noised to the next level, as ComfyUI's noise mask does.
    Returns the samples and, per step, the mean of ||H x0 - y|| of the x0-prediction the step moves toward."""
    sigmas = schedule(steps)
    g = torch.Generator().manual_seed(seed)
    y = _as_canvas(y)
    x = _as_canvas(torch.randn(y.shape[0], world.length, generator=g, dtype=torch.float64) * sigmas[0])
    denoise = window_denoiser(world, plan)
    trace = []
    for k in range(steps):
        sigma = float(sigmas[k])
        predictions = []
        for i, region in enumerate(plan.regions):
            xw = gather(x, region)
            d = denoise(i, xw, sigma)
            if method == "reconstruction":
                m = observation.mask.expand_as(x)
                with torch.enable_grad():
                    correction, _ = reconstruction_correction(xw, lambda v, i=i: denoise(i, v, sigma),
                                                              gather(y.expand_as(x), region), gather(m, region), weight)
                d = d - correction
            predictions.append(d)
        predicted = merge(plan, predictions)
        if method == "collage_reconstruction":  # the gradient of the merged x0's error
            predicted = predicted - reconstruct(plan, x, lambda b, v: denoise(b[0], v, sigma), predicted, observation,
                                                y, weight)
        if method == "replacement":
            predicted = project(observation, predicted, y)
        trace.append(float((observation(predicted) - y).flatten(1).norm(dim=1).mean()))
        x = x + (sigmas[k + 1] - sigmas[k]) * (x - predicted) / sigmas[k]
        if noised_known:
            noise = torch.randn(x.shape, generator=g, dtype=torch.float64)
            x = x + observation.pinv(y + sigmas[k + 1] * observation(noise) - observation(x))
    return x[:, 0, 0, :], trace


def sample_independent(world: GlobalStyleWorld, plan: RegionPlan, n: int, seed: int = 0) -> list[torch.Tensor]:
    """Every window sampled on its own from its exact marginal (no interaction at all)."""
    g = torch.Generator().manual_seed(seed)
    w = plan.regions[0].size[1]
    chol = torch.linalg.cholesky(world.covariance(w))
    return [torch.randn(n, w, generator=g, dtype=torch.float64) @ chol.T for _ in plan.regions]


def style_spread(windows: list[torch.Tensor]) -> float:
    """Mean over samples of the std across windows of each window's mean: 0 when every window has one style."""
    means = torch.stack([w.mean(-1) for w in windows], dim=-1)  # (n, windows)
    return float(means.std(dim=-1).mean())


def window_values(canvas: torch.Tensor, plan: RegionPlan) -> list[torch.Tensor]:
    return [gather(_as_canvas(canvas), r)[:, 0, 0, :] for r in plan.regions]
