"""AnchorSync on every plan kind (window plans, chains, cycles, grids, cubemaps) inside a real ComfyUI,
against the papers' algorithm written out below (no pack sampling code: the region geometry is the
pack's `gather` / `scatter_add`, tested on its own in test_plans.py and test_cubemap.py):

  exact mode - per synced step, decode the anchor factor's x0-prediction; move every other factor by
  w_t (1 + sigma^2) grad LPIPS; move every variable (overlap), cell by cell, by the mean of the moves of
  the factors covering the cell; denoise every region at its moved latent (its ControlNet fed the region's crop of the
  hint); take every region's Euler step; merge the steps with the DiffCollage coefficients.

  fast mode - one model evaluation: the gradient g looks at the x0-prediction at the unmoved latent and
  runs through the decoder and LPIPS only; the model's Jacobian along g is its one-evaluation estimate
  kappa = <D(x), g> / <x, g> (clamped to [0, 1]), so a factor moves by w_t (1 + sigma^2) kappa g and a moved
  region's prediction is its unmoved one shifted by kappa times its move (variables: the factors' shifts
  averaged like their moves).
"""
from __future__ import annotations

import pytest
import torch

from test_sync import build_world, s, sync_settings  # noqa: F401  (s: the shared fixture)

STEPS, SEED, WEIGHT = 2, 3, 20.0


def plans(s):
    """One plan of each kind over a small canvas, with its canvas size in pixels."""
    from controlsync.nodes.factor_graph_collage import FactorGraphCollage
    from controlsync.nodes.window_planner import WindowPlanner
    return {
        "windows": ((64, 192), WindowPlanner.execute(192, 64, 64, 64, 32, "first", 0, "uniform").args[0]),
        "chain": ((64, 192), FactorGraphCollage.execute("chain", 192, 64, 64, 64, 32, "horizontal", 1).args[0]),
        "cycle": ((64, 192), FactorGraphCollage.execute("cycle", 192, 64, 64, 64, 32, "horizontal", 0).args[0]),
        "grid": ((128, 128), FactorGraphCollage.execute("grid", 128, 128, 64, 64, 32, "horizontal", 0).args[0]),
        "corner_grid": ((128, 128), FactorGraphCollage.execute("corner_grid", 128, 128, 64, 64, 32, "horizontal", 0).args[0]),
        "cubemap": ((32, 192), FactorGraphCollage.execute("cubemap", 32, 32, 32, 32, 16, "horizontal", 0).args[0]),
    }


def world_for(s, dtype, inference, canvas_px):
    """build_world with a condition image of this canvas size."""
    saved = s.image
    s.image = s.tm.condition_image(*canvas_px)
    try:
        return build_world(s, dtype, inference), s.image
    finally:
        s.image = saved


def pack_run(s, world, plan, canvas_px, sync, batch=1, steps=STEPS):
    latent = {"samples": torch.zeros(1, 4, canvas_px[0] // 8, canvas_px[1] // 8, dtype=world["dtype"])}
    with torch.inference_mode():
        return s.Sampler.execute(world["model"], SEED, steps, 7.5, "euler", "normal", world["pos"], world["neg"], latent,
                                 plan, 1.0, batch, sync).args[0]["samples"]


class PlanReference:
    """The algorithm of the module doc on ComfyUI's model objects (float64)."""

    def __init__(self, world, image, layout, net="alex", cfg=7.5):
        import comfy.utils
        from lpips_weights import reference_lpips
        self.w, self.layout, self.cfg = world, layout, cfg
        self.model = world["model"].model
        H, W = layout.canvas
        hint = image.movedim(-1, 1).to(world["dtype"])
        self.hint = comfy.utils.common_upscale(hint, W * 8, H * 8, "nearest-exact", "center")
        self.patches = {"patches": {"input_block_patch_after_skip": [lambda h, o: h.clone()]}}
        self.lpips = reference_lpips(net, world["dtype"])
        self.factors = [i for i, f in enumerate(layout.factors_of) if f == (i,)] if layout.factors_of \
            else list(range(len(layout.regions)))

    def denoise(self, x, sigma, i):
        from controlsync.sampling import gather
        control = self.w["cn"].copy()
        control.set_cond_hint(gather(self.hint, self.layout.regions[i].scaled(8)), 1.0, (0.0, 1.0))
        control.model_sampling_current = self.model.model_sampling
        t = sigma.reshape(1).to(x.dtype).expand(x.shape[0])
        xx, tt = torch.cat([x, x]), torch.cat([t, t])
        ctx = torch.cat([self.w["neg_text"][0][0], self.w["pos_text"][0][0]])
        ctrl = control.get_control(xx, tt, {"c_crossattn": ctx}, 2, self.patches)
        uncond, cond = self.model.apply_model(xx, tt, c_crossattn=ctx, control=ctrl, transformer_options=self.patches).chunk(2)
        return uncond + (cond - uncond) * self.cfg

    def image(self, x0):
        return self.w["vae"].first_stage_model.decode(self.model.latent_format.process_out(x0)).clamp(-1, 1)

    def sample(self, weights, fast=False):
        import comfy.sample
        import comfy.samplers
        from controlsync.sampling import gather, scatter_add
        lay = self.layout
        sigmas = comfy.samplers.calculate_sigmas(self.model.model_sampling, "normal", len(weights)).to(self.w["dtype"])
        latent = torch.zeros(1, 4, *lay.canvas, dtype=self.w["dtype"])
        x = self.model.model_sampling.noise_scaling(sigmas[0], comfy.sample.prepare_noise(latent, SEED), latent,
                                                    max_denoise=True)
        for k, w_t in enumerate(weights):
            sigma, sigma_next = sigmas[k], sigmas[k + 1]
            xs = [gather(x, r) for r in lay.regions]
            with torch.no_grad():
                unmoved = [self.denoise(xr, sigma, i) if c != 0 or i == lay.anchor else None
                           for i, (xr, c) in enumerate(zip(xs, lay.coefficients))]
            move = {i: torch.zeros_like(xs[i]) for i in self.factors}
            kappa = {i: 0.0 for i in self.factors}
            if w_t > 0:
                with torch.no_grad():
                    anchor_image = self.image(unmoved[lay.anchor])
                for f in self.factors:
                    if f == lay.anchor:
                        continue
                    xf = xs[f].detach().requires_grad_(True)
                    with torch.enable_grad():
                        x0 = unmoved[f] + (xf - xf.detach()) if fast else self.denoise(xf, sigma, f)
                        (g,) = torch.autograd.grad(self.lpips(self.image(x0), anchor_image, normalize=False).sum(), xf)
                    kappa[f] = (float((unmoved[f] * g).sum() / (xs[f] * g).sum())) if fast else 1.0
                    kappa[f] = min(max(kappa[f], 0.0), 1.0)
                    move[f] = w_t * (1 + float(sigma) ** 2) * kappa[f] * g
            # a variable moves, cell by cell, by the mean of the moves of the factors covering the cell
            summed, covering = torch.zeros_like(x), torch.zeros_like(x)
            for f in self.factors:
                scatter_add(summed, lay.regions[f], move[f])
                scatter_add(covering, lay.regions[f], torch.ones_like(move[f]))
            moves = [move[i] if i in move else gather(summed / covering, r) for i, r in enumerate(lay.regions)]
            summed.zero_()
            for f in self.factors:
                scatter_add(summed, lay.regions[f], kappa[f] * move[f])
            shifts = [kappa[i] * move[i] if i in move else gather(summed / covering, r) for i, r in enumerate(lay.regions)]
            total, norm = torch.zeros_like(x), torch.zeros_like(x)
            for i, (r, c) in enumerate(zip(lay.regions, lay.coefficients)):
                if c == 0:
                    continue
                xm = xs[i] - moves[i]
                with torch.no_grad():
                    d = unmoved[i] - shifts[i] if fast else self.denoise(xm, sigma, i)
                stepped = xm + (sigma_next - sigma) * (xm - d) / sigma  # Euler = DDIM (eta 0)
                scatter_add(total, r, c * stepped)
                scatter_add(norm, r, c * torch.ones_like(stepped))
            x = total / norm
        return self.model.process_latent_out(x)


def _layout(s, world, plan, canvas_px):
    from controlsync.nodes import bridge
    return bridge.layout_for(plan, world["model"], (1, 4, canvas_px[0] // 8, canvas_px[1] // 8))


# papers' weights worked out by hand for 2 steps of a 2-step schedule with "10 of 50" scaled: round(0.4 + 0.5)
# = 0 synced steps would test nothing, so sync_steps = 50 (every step) with decay 0.95 per 25 papers' steps
HAND_WEIGHTS = [WEIGHT, WEIGHT * 0.95 ** 25]


# the exact mode on every kind; the fast mode on a row of windows and a loop (variables between factors, mixed
# sizes) - its factor/variable handling is the exact mode's
@pytest.mark.parametrize("kind,fast", [(k, False) for k in ("windows", "chain", "cycle", "grid", "corner_grid", "cubemap")]
                         + [(k, True) for k in ("windows", "cycle")],
                         ids=lambda v: v if isinstance(v, str) else ("fast" if v else "exact"))
def test_sync_on_every_plan_equals_the_papers_algorithm(s, kind, fast):
    canvas_px, plan = plans(s)[kind]
    world, image = world_for(s, torch.float64, True, canvas_px)
    plain, _ = world_for(s, torch.float64, False, canvas_px)
    layout = _layout(s, world, plan, canvas_px)
    settings = sync_settings(s, world, gradient="exact" if not fast else "skip model Jacobian")
    ours = pack_run(s, world, plan, canvas_px, settings)
    ref = PlanReference(plain, image, layout).sample(HAND_WEIGHTS, fast=fast)
    unsynced = PlanReference(plain, image, layout).sample([0.0, 0.0])
    error = (ours - ref).abs().max().item()
    moved = (ref - unsynced).abs().max().item()
    print(f"[sync plans] {kind} {'fast' if fast else 'exact'}: {len(layout.regions)} regions, "
          f"{len(PlanReference(plain, image, layout).factors)} factors; max |pack - reference| = {error:.2e}, "
          f"sync moved the result by {moved:.3f}")
    assert moved > 1e-2 and error < 1e-6 * max(1.0, ref.abs().max().item())


# factor and variable sizes mixed (both modes); turned regions (the cubemap, exact mode)
@pytest.mark.parametrize("kind,gradient", [("cycle", "exact"), ("cycle", "skip model Jacobian"), ("cubemap", "exact")])
def test_batched_gradient_passes_equal_one_at_a_time(s, kind, gradient):
    """Windows stacked into one gradient graph (and one denoising call) give what one at a time gives,
    within float rounding."""
    canvas_px, plan = plans(s)[kind]
    world, image = world_for(s, torch.float32, True, canvas_px)
    settings = sync_settings(s, world, weight=200.0, gradient=gradient)
    one = pack_run(s, world, plan, canvas_px, settings, batch=1)
    three = pack_run(s, world, plan, canvas_px, settings, batch=3)
    unsynced = pack_run(s, world, plan, canvas_px, None, batch=1)
    error = (one - three).abs().max().item()
    print(f"[sync plans] {kind} {gradient}: batch 3 vs 1 max deviation {error:.2e} (values up to "
          f"{one.abs().max().item():.0f}; sync moved {(one - unsynced).abs().max().item():.3f})")
    assert error < 1e-5 * one.abs().max().item() and (one - unsynced).abs().max().item() > 20 * max(error, 1e-9)


@pytest.mark.parametrize("kind", ["windows", "cycle", "cubemap"])
def test_batched_windows_equal_one_at_a_time_without_sync(s, kind):
    canvas_px, plan = plans(s)[kind]
    world, _ = world_for(s, torch.float32, True, canvas_px)
    one = pack_run(s, world, plan, canvas_px, None, batch=1)
    many = pack_run(s, world, plan, canvas_px, None, batch=4)
    assert (one - many).abs().max().item() < 1e-5 * one.abs().max().item()


def test_automatic_batch_size_follows_comfys_memory_estimate(s):
    """The automatic window batch for a given free-memory figure, against ComfyUI's own estimate of one
    window's model call (BaseModel.memory_required) worked through by hand: 1.5x margin, x2 with a ControlNet;
    a gradient pass keeps 3x the activations and adds the decoder and LPIPS per decoded pixel."""
    from controlsync.nodes import bridge
    world = s.inference
    layout = bridge.layout_for(s.plan, world["model"], (1, 4, 8, 24))
    import comfy.sampler_helpers
    conds = [comfy.sampler_helpers.convert_cond(world["pos"]), comfy.sampler_helpers.convert_cond(world["neg"])]
    assert any(d.get("control") is not None for d in conds[0])  # the doubling below is for this ControlNet
    one_call = world["model"].model.memory_required([2, 4, 8, 8])  # cond + uncond of one 8x8-cell window
    per_window = 2 * one_call  # a ControlNet runs too
    for windows in (1, 3, 7):
        free = windows * 1.5 * per_window + 1.0
        assert bridge.auto_window_batch(world["model"].model, layout, conds, (1, 4, 8, 24), free) == windows
        gradient = per_window * 3 + 28_000 * 1 * 64 * 64
        free = windows * 1.5 * gradient + 1.0
        assert bridge.auto_window_batch(world["model"].model, layout, conds, (1, 4, 8, 24), free, gradient=True) == windows
    assert bridge.auto_window_batch(world["model"].model, layout, conds, (1, 4, 8, 24), 0.0) == 1
