"""A per-window reference for AnchorSync, written from the papers straight on ComfyUI's model objects
(no pack code), for any guider formula and a few samplers' steps (tests/test_samplers_sync.py,
tests/test_guiders.py).

The canvas is one row of windows `WIDTH` latent cells wide (full height), merged by the uniform average
(MultiDiffusion). Per synced step (SyncDiffusion Algorithm 1, ControlSync):
  - the anchor window's x0-prediction is decoded once (no gradient);
  - every other window i moves by delta_i = w_t (1 + sigma^2) grad_{x_i} LPIPS(D(x0_i(x_i)), D(x0_anchor)),
    x0_i the guider's formula applied to window i's own per-prompt predictions (its ControlNet fed the
    window's crop of the hint) - the guider as the paper's algorithm would apply it, per window;
  - every window takes the sampler's step from its moved latent, and the steps are averaged.
Samplers with one evaluation per step (euler/ddim, CFG++ Euler, ancestral Euler, LCM) are stepped per
window. Heun's step is two evaluations: the windows start from their moved latents, and its second
evaluation is MultiDiffusion's merged one at the merged predictor (joint diffusion merges every evaluation;
without sync this is exactly ComfyUI's Heun over the merged denoiser).
"""
from __future__ import annotations


import torch

from lpips_weights import reference_lpips

WIDTH = 8  # latent cells per window (64 px)


def _copy_after_skip(h, transformer_options):
    return h.clone()  # ControlNet residuals are added in place; keep the skip tensor autograd saved intact


def _perturbed_attention(q, k, v, extra_options, mask=None):
    return v  # Perturbed-Attention Guidance: self-attention replaced by the identity (PAG paper, ComfyUI's node)


class WindowReference:
    """`world`: plain (non-inference) models, as tests/test_sync.py's build_world makes them.
    `conds`: role -> (text embedding (1, tokens, dim), whether the ControlNet is applied to it).
    `guide(pred, sigma, x)`: the guider's x0 for window latent x, `pred(role, perturbed=False)` giving that window's
    prediction for a prompt (perturbed: PAG's perturbed self-attention in the middle block)."""

    def __init__(self, world, image, starts, conds, guide, net="alex", anchor=0):
        self.w, self.starts, self.conds, self.guide, self.anchor = world, list(starts), conds, guide, anchor
        self.model = world["model"].model
        self.dtype = world["dtype"]
        self.hint = image.movedim(-1, 1).to(self.dtype)
        self.lpips = reference_lpips(net, self.dtype)
        self.evaluations = []  # (sigma, window, role, perturbed, x requires grad) of every model call

    # --- one window's predictions -------------------------------------------------------------
    def predict(self, x, sigma, window, role, perturbed=False):
        """The model's x0-prediction of window `window` for the prompt of `role` (ComfyUI's apply_model)."""
        context, controlled = self.conds[role]
        t = sigma.reshape(1).to(x.dtype).expand(x.shape[0])
        options = {"patches": {"input_block_patch_after_skip": [_copy_after_skip]}}
        if perturbed:
            options["patches_replace"] = {"attn1": {("middle", 0): _perturbed_attention}}
        context = context.to(x.dtype)
        control = None
        if controlled:
            start = self.starts[window]
            c = self.w["cn"].copy()
            c.set_cond_hint(self.hint[..., start * 8:(start + WIDTH) * 8], 1.0, (0.0, 1.0))
            c.model_sampling_current = self.model.model_sampling
            control = c.get_control(x, t, {"c_crossattn": context}, 1, options)
        self.evaluations.append((float(sigma), window, role, perturbed, x.requires_grad))
        return self.model.apply_model(x, t, c_crossattn=context, control=control, transformer_options=options)

    def x0(self, x, sigma, window, shift=None):
        """The guider's x0 for window latent x, and the window's per-prompt predictions. `shift`: the fast
        mode's moved window - every prediction at x (the unmoved latent) taken minus its predicted shift."""
        cache = {}

        def pred(role, perturbed=False):
            if (role, perturbed) not in cache:
                cache[(role, perturbed)] = self.predict(x, sigma, window, role, perturbed)
            return cache[(role, perturbed)] if shift is None else cache[(role, perturbed)] - shift
        return self.guide(pred, sigma, x if shift is None else x - shift), pred

    def image(self, x0):
        z = self.model.latent_format.process_out(x0)
        return self.w["vae"].first_stage_model.decode(z).clamp(-1, 1)

    # --- the sync move ----------------------------------------------------------------------------
    def moved_windows(self, x, sigma, weight, fast=False):
        """(unmoved, moved, kappas) windows. `fast`: the gradient g = grad_{x0} LPIPS at the unmoved window's
        x0-prediction, the model's Jacobian replaced by its slope along g as that evaluation shows it,
        kappa = <x0, g> / <x, g> clamped to [0, 1] (eps models: 1 / alpha = 1); the window moves by
        w (1 + sigma^2) kappa g and its prediction by kappa times that."""
        windows = [x[..., s:s + WIDTH].clone() for s in self.starts]
        kappas = [1.0] * len(windows)
        if weight == 0:
            return windows, list(windows), kappas
        with torch.no_grad():
            anchor_image = self.image(self.x0(windows[self.anchor], sigma, self.anchor)[0])
        moved = list(windows)
        for k, xk in enumerate(windows):
            if k == self.anchor:
                continue
            xk = xk.detach().requires_grad_(True)
            with torch.enable_grad():
                if fast:
                    with torch.no_grad():
                        unmoved_x0 = self.x0(windows[k], sigma, k)[0]
                    x0 = unmoved_x0 + (xk - xk.detach())
                else:
                    x0 = self.x0(xk, sigma, k)[0]
                loss = self.lpips(self.image(x0), anchor_image, normalize=False).sum()
                (g,) = torch.autograd.grad(loss, xk)
            if fast:
                kappas[k] = min(max(float((unmoved_x0 * g).sum() / (windows[k] * g).sum()), 0.0), 1.0)
            moved[k] = windows[k] - weight * (1 + float(sigma) ** 2) * kappas[k] * g
        return windows, moved, kappas

    def merge(self, like, windows):
        total, count = torch.zeros_like(like), torch.zeros_like(like)
        for s, w in zip(self.starts, windows):
            total[..., s:s + WIDTH] += w
            count[..., s:s + WIDTH] += 1
        return total / count

    def merged_x0(self, x, sigma):
        with torch.no_grad():
            return self.merge(x, [self.x0(x[..., s:s + WIDTH], sigma, k)[0] for k, s in enumerate(self.starts)])

    # --- the samplers' steps, per window ----------------------------------------------------------
    def step(self, kind, x, windows, moved, sigma, sigma_next, noise, fast=False, kappas=None):
        with torch.no_grad():
            if fast:
                preds = [self.x0(w, sigma, k, shift=kappa * (w - m))
                         for k, (w, m, kappa) in enumerate(zip(windows, moved, kappas))]
            else:
                preds = [self.x0(m, sigma, k) for k, m in enumerate(moved)]
        ratio = sigma_next / sigma
        if kind == "euler":  # = DDIM with eta 0 in ComfyUI's sigma space
            return self.merge(x, [m + (sigma_next - sigma) * (m - d) / sigma for m, (d, _) in zip(moved, preds)])
        if kind == "cfg_pp":  # CFG++ Euler (ComfyUI's euler_cfg_pp): x_next = D + (sigma_next / sigma) (x - U)
            return self.merge(x, [d + ratio * (m - p("negative")) for m, (d, p) in zip(moved, preds)])
        if kind == "lcm":
            out = self.merge(x, [d for d, _ in preds])
            return out + sigma_next * noise() if sigma_next > 0 else out
        if kind == "euler_ancestral":  # eta 1, as ComfyUI's sampler (k-diffusion's get_ancestral_step)
            if sigma_next == 0:
                return self.merge(x, [d for d, _ in preds])
            up = min(sigma_next, (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
            down = (sigma_next ** 2 - up ** 2) ** 0.5
            stepped = self.merge(x, [m + (down - sigma) * (m - d) / sigma for m, (d, _) in zip(moved, preds)])
            return stepped + noise() * up
        if kind == "heun":
            slopes = [(m - d) / sigma for m, (d, _) in zip(moved, preds)]
            if sigma_next == 0:
                return self.merge(x, [m + (sigma_next - sigma) * s for m, s in zip(moved, slopes)])
            predictor = self.merge(x, [m + (sigma_next - sigma) * s for m, s in zip(moved, slopes)])
            slope_2 = (predictor - self.merged_x0(predictor, sigma_next)) / sigma_next
            return self.merge(x, [m + (sigma_next - sigma) * (s + slope_2[..., st:st + WIDTH]) / 2
                                  for m, s, st in zip(moved, slopes, self.starts)])
        raise ValueError(kind)

    def sample(self, sigmas, seed, weights, kind="euler", latent_shape=None, fast=False):
        """The final latent (as ComfyUI returns it) for the schedule `sigmas` and the per-step weights w_t.
        `fast`: AnchorSync's 'skip model Jacobian' mode (one model evaluation per window and step)."""
        import comfy.k_diffusion.sampling
        import comfy.sample
        sigmas = sigmas.to(self.dtype)
        latent = torch.zeros(latent_shape, dtype=self.dtype)
        noise = comfy.sample.prepare_noise(latent, seed)
        max_sigma = float(self.model.model_sampling.sigma_max)
        max_denoise = abs(float(sigmas[0]) - max_sigma) <= 1e-5 * max_sigma or float(sigmas[0]) > max_sigma
        x = self.model.model_sampling.noise_scaling(sigmas[0], noise, latent, max_denoise=max_denoise)
        # k-diffusion's default noise sampler as the host seeds it (0.33 seeds `seed + 1` on the CPU, 0.3.64 `seed`)
        noise_sampler = comfy.k_diffusion.sampling.default_noise_sampler(x, seed=seed)

        def draw():
            return noise_sampler(None, None)
        for i in range(len(sigmas) - 1):
            windows, moved, kappas = self.moved_windows(x, sigmas[i], weights[i] if i < len(weights) else 0.0, fast)
            x = self.step(kind, x, windows, moved, sigmas[i], sigmas[i + 1], draw, fast, kappas)
        return self.model.process_latent_out(x)
