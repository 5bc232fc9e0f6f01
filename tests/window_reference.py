"""The papers' AnchorSync written out for the tests, straight on ComfyUI's model objects (no pack code), for
any guider formula and any ComfyUI sampler (tests/test_samplers_sync.py, tests/test_guiders.py).

The canvas is one row of windows `WIDTH` latent cells wide (full height), merged by the uniform average
(MultiDiffusion). The sampler is ComfyUI's own sampler function, run on `PapersDenoiser`: at the first
model evaluation of every synced step (the first one after the sampler reported the previous step):
  - the anchor window's x0-prediction is decoded once (no gradient);
  - every other window i moves by delta_i = w_t c^2 grad_{x_i} LPIPS(D(x0_i(x_i)), D(x0_anchor)), with
    c^2 = alpha^2 + sigma^2 the paper's step in the model's own space (1 + sigma^2 for eps models,
    (1 - sigma)^2 + sigma^2 for flow models), x0_i the guider's formula applied to window i's own per-prompt
    predictions (its ControlNet fed the window's crop of the hint) - the guider as the paper's algorithm
    would apply it, per window;
  - every window is denoised from its moved latent and the predictions are averaged (MultiDiffusion);
  - the canvas of the moved windows, x - mean(delta), is what the sampler steps from: its own x is moved.
The fast mode ("skip model Jacobian"): the gradient g = grad_{x0} LPIPS stops at the unmoved window's
x0-prediction; u = w_t c^2 g; the window's slope along u from one evaluation at x - u,
kappa = <x0(x) - x0(x - u), u> / <u, u> clamped to [0, 1 / alpha]; the window moves by kappa u and its
predictions by kappa (x0(x) - x0(x - u)).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

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
    prediction for a prompt (perturbed: PAG's perturbed self-attention in the middle block).
    `flow`: the model samples x = (1 - sigma) x0 + sigma eps (else x = x0 + sigma eps). `batch_prompts`: every
    prompt without ControlNet predicted in one call (for guides that use them all)."""

    def __init__(self, world, image, starts, conds, guide, net="alex", anchor=0, flow=False, batch_prompts=False):
        self.batch_prompts = batch_prompts
        self.w, self.starts, self.conds, self.guide, self.anchor, self.flow = world, list(starts), conds, guide, anchor, flow
        self.model = world["model"].model
        self.dtype = world["dtype"]
        self.hint = None if image is None else image.movedim(-1, 1).to(self.dtype)
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

    def predict_together(self, x, sigma, roles):
        """The predictions of several prompts without ControlNet in one model call (as ComfyUI batches them)."""
        context = torch.cat([self.conds[r][0] for r in roles]).to(x.dtype)
        t = sigma.reshape(1).to(x.dtype).expand(x.shape[0] * len(roles))
        out = self.model.apply_model(x.repeat(len(roles), *([1] * (x.ndim - 1))), t, c_crossattn=context)
        return dict(zip(((r, False) for r in roles), out.chunk(len(roles))))

    def x0(self, x, sigma, window, shift=None):
        """The guider's x0 for window latent x, and the window's per-prompt predictions. `shift`: the fast
        mode's moved window - every prediction at x (the unmoved latent) taken minus its predicted shift."""
        together = [r for r, (_, controlled) in self.conds.items() if not controlled]
        cache = self.predict_together(x, sigma, together) if self.batch_prompts and len(together) > 1 else {}

        def pred(role, perturbed=False):
            if (role, perturbed) not in cache:
                cache[(role, perturbed)] = self.predict(x, sigma, window, role, perturbed)
            return cache[(role, perturbed)] if shift is None else cache[(role, perturbed)] - shift
        return self.guide(pred, sigma, x), pred

    def image(self, x0):
        z = self.model.latent_format.process_out(x0)
        return self.w["vae"].first_stage_model.decode(z).clamp(-1, 1)

    def step_scale(self, sigma):
        s = float(sigma)
        return (1 - s) ** 2 + s ** 2 if self.flow else 1 + s ** 2

    def slope_bound(self, sigma):
        alpha = 1 - float(sigma) if self.flow else 1.0
        return 1 / alpha if alpha > 0 else 0.0

    # --- the sync move ----------------------------------------------------------------------------
    def moved_windows(self, x, sigma, weight, fast=False):
        """(unmoved windows, moved windows, per-window prediction shifts or None)."""
        windows = [x[..., s:s + WIDTH].clone() for s in self.starts]
        if weight == 0:
            return windows, list(windows), None
        with torch.no_grad():
            anchor_image = self.image(self.x0(windows[self.anchor], sigma, self.anchor)[0])
        moved, shifts = list(windows), [torch.zeros_like(w) for w in windows]
        scale = weight * self.step_scale(sigma)
        for k, xk in enumerate(windows):
            if k == self.anchor:
                continue
            if fast:
                with torch.no_grad():
                    x0 = self.x0(xk, sigma, k)[0]
                x0 = x0.detach().requires_grad_(True)
                with torch.enable_grad():
                    (g,) = torch.autograd.grad(self.lpips(self.image(x0), anchor_image, normalize=False).sum(), x0)
                u = scale * g
                with torch.no_grad():
                    probe = self.x0(xk - u, sigma, k)[0]
                kappa = float(((x0.detach() - probe) * u).sum() / (u * u).sum()) if bool(u.any()) else 0.0
                kappa = min(max(kappa, 0.0), self.slope_bound(sigma))
                moved[k], shifts[k] = xk - kappa * u, kappa * (x0.detach() - probe)
            else:
                xk = xk.detach().requires_grad_(True)
                with torch.enable_grad():
                    loss = self.lpips(self.image(self.x0(xk, sigma, k)[0]), anchor_image, normalize=False).sum()
                    (g,) = torch.autograd.grad(loss, xk)
                moved[k] = windows[k] - scale * g
        return windows, moved, shifts if fast else None

    def merge(self, like, windows):
        total, count = torch.zeros_like(like), torch.zeros_like(like)
        for s, w in zip(self.starts, windows):
            total[..., s:s + WIDTH] += w
            count[..., s:s + WIDTH] += 1
        return total / count

    # --- sampling --------------------------------------------------------------------------------
    def sample(self, sampler_name, sigmas, seed, weights, latent_shape, fast=False, cfg_scale=1.0):
        """The final latent (as ComfyUI returns it): ComfyUI's sampler `sampler_name` run on the papers'
        algorithm, `weights` the w_t of every step (missing: 0). `cfg_scale`: what CFG++ samplers' post-CFG
        hook is told the guidance scale is."""
        import comfy.sample
        import comfy.samplers
        sampler = comfy.samplers.sampler_object(sampler_name)
        model_sampling = self.model.model_sampling
        sigmas = sigmas.to(self.dtype)
        latent = torch.zeros(latent_shape, dtype=self.dtype)
        noise = comfy.sample.prepare_noise(latent, seed)
        max_sigma, first = float(model_sampling.sigma_max), float(sigmas[0])
        max_denoise = math.isclose(max_sigma, first, rel_tol=1e-05) or first > max_sigma
        x = model_sampling.noise_scaling(sigmas[0], noise, latent, max_denoise)
        extra_args = {"seed": seed, "model_options": {}}
        # which evaluation starts which step: the one right before the sampler reports the step (Heun's second
        # evaluation comes after its report), found by running the sampler once on a denoiser that costs nothing
        dry = PapersDenoiser(self, [], fast, cfg_scale)
        with torch.random.fork_rng():
            sampler.sampler_function(dry, x.clone(), sigmas, extra_args=dict(extra_args), callback=dry.reported,
                                     disable=True, **sampler.extra_options)
        denoiser = PapersDenoiser(self, list(weights), fast, cfg_scale, firsts=dry.states)
        out = sampler.sampler_function(denoiser, x, sigmas, extra_args=extra_args, callback=denoiser.reported,
                                       disable=True, **sampler.extra_options)
        self.states, self.moves = denoiser.states + [out], denoiser.moves
        return self.model.process_latent_out(model_sampling.inverse_noise_scaling(sigmas[-1], out))


class PapersDenoiser:
    """What a ComfyUI sampler function evaluates: the papers' windows, moved at each synced step's first
    evaluation, denoised, averaged; the sampler's own x moved to the canvas of the moved windows. Without
    `firsts` (a dry run): x / (1 + sigma^2), noting which evaluation comes right before each report."""

    def __init__(self, ref: WindowReference, weights, fast, cfg_scale, firsts=None):
        self.ref, self.weights, self.fast, self.cfg_scale, self.firsts = ref, weights, fast, cfg_scale, firsts
        self.calls, self.states, self.moves = 0, [], []
        # what samplers read off the model they are given (k-diffusion's model.inner_model...)
        self.inner_model = SimpleNamespace(model_patcher=ref.w["model"], inner_model=ref.model,
                                           model_sampling=ref.model.model_sampling)

    def reported(self, d):
        if self.firsts is None:
            self.states.append(self.calls - 1)
        else:
            self.states.append(d["x"].clone())

    def post_cfg(self, denoised, cond, uncond, x, sigma, model_options):
        for fn in (model_options or {}).get("sampler_post_cfg_function", []):
            denoised = fn({"denoised": denoised, "cond_denoised": cond, "uncond_denoised": uncond, "input": x,
                           "sigma": sigma, "cond_scale": self.cfg_scale, "model": None, "cond": None, "uncond": None,
                           "model_options": model_options})
        return denoised

    def __call__(self, x, sigma, model_options=None, seed=None, **kwargs):
        self.calls += 1
        if self.firsts is None:
            s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x)
            return self.post_cfg(x / (1 + s * s), x / (1 + s * s), x / (1 + s * s), x, sigma, model_options)
        ref = self.ref
        step = self.firsts.index(self.calls - 1) if self.calls - 1 in self.firsts else None
        weight = self.weights[step] if step is not None and step < len(self.weights) else 0.0
        s = sigma.flatten()[0]
        windows, moved, shifts = ref.moved_windows(x, s, weight, self.fast)
        with torch.no_grad():
            if shifts is not None:
                preds = [ref.x0(w, s, k, shift=shift) for k, (w, shift) in enumerate(zip(windows, shifts))]
            else:
                preds = [ref.x0(m, s, k) for k, m in enumerate(moved)]
        denoised = ref.merge(x, [d for d, _ in preds])
        if "negative" in ref.conds:  # CFG++ samplers read the unguided prediction through a post-CFG hook
            denoised = self.post_cfg(denoised, ref.merge(x, [p("positive") for _, p in preds]),
                                     ref.merge(x, [p("negative") for _, p in preds]), x, sigma, model_options)
        if weight > 0:
            move = ref.merge(x, [w - m for w, m in zip(windows, moved)])
            self.moves.append(float(move.abs().max()))
            x.sub_(move)
        return denoised
