"""AnchorSync on every plan kind (window plans, chains, cycles, grids, cubemaps) inside a real ComfyUI,
against the papers' algorithm written out below (no pack code: the regions are the plan's data - blocks
of canvas cells, turned by quarter turns - cut and pasted back by this file's own `cut` / `paste_add`):

  exact mode - per synced step, decode the anchor factor's x0-prediction; move every other factor by
  w_t (1 + sigma^2) grad LPIPS; move every variable (overlap), cell by cell, by the mean of the moves of
  the factors covering the cell; denoise every region at its moved latent (its ControlNet fed the region's crop of the
  hint); take every region's Euler step; merge the steps with the DiffCollage coefficients.

  fast mode - no backward pass through the model: the gradient g looks at the x0-prediction at the unmoved
  latent and runs through the decoder and LPIPS only; u = w_t (1 + sigma^2) g; the model's slope along u
  from one evaluation at x - u, kappa = <D(x) - D(x - u), u> / <u, u> (clamped to [0, 1]); a factor moves by
  kappa u and its prediction by kappa (D(x) - D(x - u)) (variables: the factors' moves and shifts averaged).
"""
from __future__ import annotations

import pytest
import torch

from test_sync import build_world, s, sync_settings  # noqa: F401  (s: the shared fixture)

STEPS, SEED, WEIGHT = 2, 3, 20.0
# within float32 rounding of the result's largest value (ComfyUI hands model outputs back in float32, also for
# float64 models): ~1e-6 is seen; the sync moves the results by 1e-3 to 1e-2 of it
EXACT = 5e-5


def cut(canvas, region):
    """The region's cells of `canvas` (..., H, W): its pieces, each turned as the region sees it."""
    out = canvas.new_zeros(canvas.shape[:-2] + region.size)
    for p in region.pieces:
        (sy, sx), (dy, dx), (h, w) = p.src, p.dst, p.size
        block = torch.rot90(canvas[..., sy:sy + h, sx:sx + w], p.turns, dims=(-2, -1))
        out[..., dy:dy + block.shape[-2], dx:dx + block.shape[-1]] = block
    return out


def paste_add(canvas, region, values):
    """canvas[region] += values, every piece turned back."""
    for p in region.pieces:
        (sy, sx), (dy, dx), (h, w) = p.src, p.dst, p.size
        dh, dw = (h, w) if p.turns % 2 == 0 else (w, h)
        canvas[..., sy:sy + h, sx:sx + w] += torch.rot90(values[..., dy:dy + dh, dx:dx + dw], -p.turns, dims=(-2, -1))


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
        control = self.w["cn"].copy()
        control.set_cond_hint(cut(self.hint, self.layout.regions[i].scaled(8)), 1.0, (0.0, 1.0))
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
        lay = self.layout
        sigmas = comfy.samplers.calculate_sigmas(self.model.model_sampling, "normal", len(weights)).to(self.w["dtype"])
        latent = torch.zeros(1, 4, *lay.canvas, dtype=self.w["dtype"])
        x = self.model.model_sampling.noise_scaling(sigmas[0], comfy.sample.prepare_noise(latent, SEED), latent,
                                                    max_denoise=True)
        for k, w_t in enumerate(weights):
            sigma, sigma_next = sigmas[k], sigmas[k + 1]
            xs = [cut(x, r) for r in lay.regions]
            with torch.no_grad():
                unmoved = [self.denoise(xr, sigma, i) if c != 0 or i == lay.anchor else None
                           for i, (xr, c) in enumerate(zip(xs, lay.coefficients))]
            move = {i: torch.zeros_like(xs[i]) for i in self.factors}
            shift = {i: torch.zeros_like(xs[i]) for i in self.factors}
            if w_t > 0:
                with torch.no_grad():
                    anchor_image = self.image(unmoved[lay.anchor])
                for f in self.factors:
                    if f == lay.anchor:
                        continue
                    scale = w_t * (1 + float(sigma) ** 2)
                    with torch.enable_grad():
                        if fast:  # the gradient stops at the unmoved prediction
                            x0 = unmoved[f].detach().requires_grad_(True)
                            (g,) = torch.autograd.grad(self.lpips(self.image(x0), anchor_image, normalize=False).sum(), x0)
                        else:
                            xf = xs[f].detach().requires_grad_(True)
                            loss = self.lpips(self.image(self.denoise(xf, sigma, f)), anchor_image, normalize=False).sum()
                            (g,) = torch.autograd.grad(loss, xf)
                    if fast:
                        u = scale * g
                        with torch.no_grad():
                            probe = self.denoise(xs[f] - u, sigma, f)
                        kappa = min(max(float(((unmoved[f] - probe) * u).sum() / (u * u).sum()), 0.0), 1.0)
                        move[f], shift[f] = kappa * u, kappa * (unmoved[f] - probe)
                    else:
                        move[f] = scale * g
            # a variable moves, cell by cell, by the mean of the moves of the factors covering the cell
            moves, shifts = self.spread(x, move), self.spread(x, shift)
            total, norm = torch.zeros_like(x), torch.zeros_like(x)
            for i, (r, c) in enumerate(zip(lay.regions, lay.coefficients)):
                if c == 0:
                    continue
                xm = xs[i] - moves[i]
                with torch.no_grad():
                    d = unmoved[i] - shifts[i] if fast else self.denoise(xm, sigma, i)
                stepped = xm + (sigma_next - sigma) * (xm - d) / sigma  # Euler = DDIM (eta 0)
                paste_add(total, r, c * stepped)
                paste_add(norm, r, c * torch.ones_like(stepped))
            x = total / norm
        return self.model.process_latent_out(x)

    def spread(self, x, per_factor):
        """Every region's share: a factor its own; another region, cell by cell, the factors' mean."""
        lay = self.layout
        summed, covering = torch.zeros_like(x), torch.zeros_like(x)
        for f in self.factors:
            paste_add(summed, lay.regions[f], per_factor[f])
            paste_add(covering, lay.regions[f], torch.ones_like(per_factor[f]))
        return [per_factor[i] if i in per_factor else cut(summed / covering, r) for i, r in enumerate(lay.regions)]


def _layout(s, world, plan, canvas_px):
    """The plan laid out on the canvas latent (8 px per cell, no patch grid: SD1.5)."""
    return plan.layout((canvas_px[0] // 8, canvas_px[1] // 8), 8, 1)


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
    assert error < EXACT * ref.abs().max().item() and moved > 20 * EXACT * ref.abs().max().item()


# factor and variable sizes mixed (both modes); turned regions (the cubemap, exact mode)
@pytest.mark.parametrize("kind,gradient", [("cycle", "exact"), ("cycle", "skip model Jacobian"), ("cubemap", "exact")])
def test_batched_gradient_passes_equal_one_at_a_time(s, kind, gradient):
    """Windows stacked into one gradient graph (and one denoising call) give what one at a time gives,
    within float rounding; the model saw the stacked batches (an APPLY_MODEL hook)."""
    canvas_px, plan = plans(s)[kind]
    world, image = world_for(s, torch.float32, True, canvas_px)
    settings = sync_settings(s, world, weight=200.0, gradient=gradient)
    one, one_seen = pack_run_seen(s, world, plan, canvas_px, settings, batch=1)
    three, three_seen = pack_run_seen(s, world, plan, canvas_px, settings, batch=3)
    unsynced = pack_run(s, world, plan, canvas_px, None, batch=1)
    error = (one - three).abs().max().item()
    print(f"[sync plans] {kind} {gradient}: batch 3 vs 1 max deviation {error:.2e} (values up to "
          f"{one.abs().max().item():.0f}; sync moved {(one - unsynced).abs().max().item():.3f}); model batches "
          f"seen one at a time {sorted(set(one_seen))}, three at a time {sorted(set(three_seen))}")
    assert error < 1e-5 * one.abs().max().item() and (one - unsynced).abs().max().item() > 20 * max(error, 1e-9)
    # cond and uncond go in one call: 2 per window; stacked, up to 3 windows' worth (exact mode: in the
    # gradient graphs too)
    assert max(b for b, _ in one_seen) == 2 and max(b for b, _ in three_seen) == 6
    if gradient == "exact":
        assert max(b for b, grad in three_seen if grad) == 6 and max(b for b, grad in one_seen if grad) == 2


def pack_run_seen(s, world, plan, canvas_px, sync, batch):
    """pack_run, and the (batch size, autograd runs through it) of every model call."""
    seen = []

    def record(executor, x, *args, **kwargs):
        seen.append((x.shape[0], x.requires_grad))
        return executor(x, *args, **kwargs)
    model = world["model"].clone()
    model.add_wrapper_with_key(s.pe.WrappersMP.APPLY_MODEL, "test.batches", record)
    return pack_run(s, dict(world, model=model), plan, canvas_px, sync, batch=batch), seen


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


# --- Reconstruction (known pixels) with AnchorSync, on a real x0 ---------------------------------------------

def test_reconstruction_with_sync_equals_the_papers_algorithm(s):
    """An outpainting chain (the left window's cells known, kept by Reconstruction) with AnchorSync, against the
    papers written out here: per step the factors move toward the anchor (it is the known window), every region is
    denoised at its moved latent, the collage's x0 is merged, Reconstruction takes (w / 2) grad_x ||mask (x0(x) -
    y)||^2 through that same x0 - the regions at their moved latents - and the moved canvas takes an Euler step
    with x0 minus that."""
    from controlsync.nodes.factor_graph_collage import FactorGraphCollage
    import comfy.sample
    import comfy.samplers
    canvas_px = (64, 192)
    plan = FactorGraphCollage.execute("chain", 192, 64, 64, 64, 32, "horizontal", 0,
                                      known_pixels="reconstruction", reconstruction_weight=1.0).args[0]
    world, image = world_for(s, torch.float64, True, canvas_px)
    plain, _ = world_for(s, torch.float64, False, canvas_px)
    known = torch.randn(1, 4, 8, 24, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    mask = torch.ones(1, 1, 8, 24, dtype=torch.float64)
    mask[..., :8] = 0.0  # 1 = to generate: the left window's cells are known
    settings = sync_settings(s, world, gradient="exact")

    def ours(sync):
        latent = {"samples": known.clone(), "noise_mask": mask.clone()}
        with torch.inference_mode():
            return s.Sampler.execute(world["model"], SEED, STEPS, 7.5, "euler", "normal", world["pos"], world["neg"],
                                     latent, plan, 1.0, 1, sync).args[0]["samples"]
    pack, unsynced = ours(settings), ours(None)

    ref = PlanReference(plain, image, _layout(s, plain, plan, canvas_px))
    lay, model = ref.layout, ref.model
    y = model.process_latent_in(known)
    observed = 1.0 - mask
    sigmas = comfy.samplers.calculate_sigmas(model.model_sampling, "normal", STEPS).to(torch.float64)
    x = model.model_sampling.noise_scaling(sigmas[0], comfy.sample.prepare_noise(known, SEED), y, max_denoise=True)
    for k, w_t in enumerate(HAND_WEIGHTS):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        xs = [cut(x, r) for r in lay.regions]
        move = {f: torch.zeros_like(xs[f]) for f in ref.factors}
        with torch.no_grad():
            anchor_image = ref.image(ref.denoise(xs[lay.anchor], sigma, lay.anchor))
        for f in ref.factors:
            if f == lay.anchor:
                continue
            xf = xs[f].detach().requires_grad_(True)
            with torch.enable_grad():
                loss = ref.lpips(ref.image(ref.denoise(xf, sigma, f)), anchor_image, normalize=False).sum()
                (g,) = torch.autograd.grad(loss, xf)
            move[f] = w_t * (1 + float(sigma) ** 2) * g
        moves = ref.spread(x, move)

        def merged(canvas):
            total, norm = torch.zeros_like(canvas), torch.zeros_like(canvas)
            for i, (r, c) in enumerate(zip(lay.regions, lay.coefficients)):
                if c != 0:
                    paste_add(total, r, c * ref.denoise(cut(canvas, r) - moves[i], sigma, i))
                    paste_add(norm, r, c * torch.ones_like(moves[i]))
            return total / norm
        xg = x.detach().requires_grad_(True)
        with torch.enable_grad():
            x0 = merged(xg)
            (correction,) = torch.autograd.grad((observed * (x0 - y)).pow(2).sum(), xg)
        d = x0.detach() - 0.5 * correction
        moved = x - merged_moves(lay, x, moves)
        x = moved + (sigma_next - sigma) * (moved - d) / sigma
    reference = model.process_latent_out(x)
    error, effect = (pack - reference).abs().max().item(), (pack - unsynced).abs().max().item()
    scale = reference.abs().max().item()
    print(f"[sync plans] outpainting chain, Reconstruction + AnchorSync: max |pack - reference| = {error:.2e} "
          f"(values up to {scale:.0f}); sync moved the result by {effect:.3f}")
    assert error < EXACT * scale and effect > 20 * EXACT * scale


def merged_moves(lay, x, moves):
    """The canvas move: the plan's merge of every region's move (coefficients summing to 1 on each cell)."""
    total, norm = torch.zeros_like(x), torch.zeros_like(x)
    for r, c, m in zip(lay.regions, lay.coefficients, moves):
        paste_add(total, r, c * m)
        paste_add(norm, r, c * torch.ones_like(m))
    return total / norm
