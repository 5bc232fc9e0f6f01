"""Upscaling on the real node (ComfyUI, tiny seeded SD1.5 model, ControlNet and VAE): img2img at denoise < 1 on a
canvas encoded with ComfyUI's own tiled VAE encode, with Anchor Sync counted from the steps that run."""
from __future__ import annotations

import pytest
import torch

from test_sync import build_world, s, world64  # noqa: F401  (the shared fixtures: a 192x64 canvas of five 64 px windows, stride 32)
from test_samplers_sync import gradient_pass_counter

SEED, STEPS, DENOISE = 3, 10, 0.5


@pytest.fixture(scope="module")
def encoded(s):
    """The canvas image encoded by ComfyUI's VAE Encode (Tiled), 64 px tiles overlapping by 16."""
    with torch.inference_mode():
        (latent,) = s.nodes.VAEEncodeTiled().encode(s.inference["vae"], s.image, 64, 16)
    return latent


def img2img(s, latent, sync, model=None):
    world = s.inference
    with torch.inference_mode():
        out = s.Sampler.execute(model or world["model"], SEED, STEPS, 7.5, "euler", "normal", world["pos"],
                                world["neg"], latent, s.plan, DENOISE, 0, sync)
    return out.args[0]["samples"]


def test_img2img_at_denoise_half_syncs_the_first_steps_that_run(s, encoded):
    """KSampler's denoise 0.5 at 10 steps runs the last 10 of 20. Anchor Sync (10 of 50) counted from the schedule
    syncs none of them (its 4 synced steps of 20 are skipped); counted from the run it syncs the first
    floor(10 * 10 / 50 + 0.5) = 2 that run: the gradient passes, counted below the pack on the real model, are
    those two steps' sigmas once per non-anchor window, and the result moves."""
    import comfy.samplers
    world = s.inference
    sigmas = comfy.samplers.KSampler(world["model"], STEPS, "cpu", "euler", "normal", DENOISE).sigmas.tolist()
    windows = len(s.plan.layout((8, 24)).regions)
    results = {}
    for count_from, synced in (("schedule", 0), ("run", 2)):
        record = []
        counted = world["model"].clone()
        counted.add_wrapper_with_key(s.pe.WrappersMP.APPLY_MODEL, "test.gradient_passes", gradient_pass_counter(record))
        with torch.inference_mode():
            sync = s.Sync.execute(world["vae"], 20.0, 0.95, 10, "alex", "exact", count_from=count_from).args[0]
        results[count_from] = img2img(s, encoded, sync, counted)
        assert record == pytest.approx([sigma for sigma in sigmas[:synced] for _ in range(windows - 1)], rel=1e-5)
    unsynced = img2img(s, encoded, None)
    assert torch.equal(results["schedule"], unsynced)
    moved = float((results["run"] - unsynced).norm() / unsynced.norm())
    print(f"[upscale] img2img at denoise {DENOISE}: sync counted from the run moves the result by {moved:.4f} (relative)")
    assert moved > 1e-3


@pytest.mark.parametrize("low_res", [(16, 48), (24, 72)])
def test_tile_controlnet_on_the_low_resolution_input_gets_each_windows_crop(s, encoded, low_res):
    """A tile ControlNet's condition is the low-resolution input itself, at any size (here 1/4 and 3/8 of the
    192x64 canvas): a forward hook on the real ControlNet module sees, for every window, the window's crop of
    that image resized to the canvas as ComfyUI resizes a hint (common_upscale, the ControlNet's algorithm)."""
    import comfy.utils
    world = s.inference
    small = torch.nn.functional.interpolate(s.image.movedim(-1, 1), size=low_res, mode="area").movedim(1, -1)
    with torch.inference_mode():
        tile = s.tm.tiny_controlnet(7)
        pos, neg = s.nodes.ControlNetApplyAdvanced().apply_controlnet(world["pos_text"], world["neg_text"], tile, small,
                                                                      1.0, 0.0, 1.0)
    hints = []
    handle = tile.control_model.register_forward_hook(lambda m, a, kw, out: hints.append(kw["hint"].clone()),
                                                      with_kwargs=True)
    try:
        with torch.inference_mode():
            s.Sampler.execute(world["model"], SEED, 2, 7.5, "euler", "normal", pos, neg, encoded, s.plan, DENOISE, 1)
    finally:
        handle.remove()
    canvas_hint = comfy.utils.common_upscale(small.movedim(-1, 1), 192, 64, tile.upscale_algorithm, "center")
    starts = [0, 32, 64, 96, 128]
    assert len(hints) == 2 * len(starts)  # two steps, one call per window (cond and uncond batched)
    for i, hint in enumerate(hints):
        x0 = starts[i % len(starts)]
        assert hint.shape[-2:] == (64, 64)
        assert torch.equal(hint[0], canvas_hint[0, :, :, x0:x0 + 64].to(hint.dtype)), (i, x0)


# ---- the Low-pass Guide -------------------------------------------------------------------------------------------

LOW_RES = (32, 96)  # y: half the 192x64 canvas; its latent grid is 12x4 cells, H averages 2x2 latent cells


def guide(s, method="replacement", space="latent", weight=1.0, image=None, vae=None):
    from controlsync.nodes.lowpass_guide import ControlSyncLowPass
    small = image if image is not None else torch.nn.functional.interpolate(
        s.image.movedim(-1, 1), size=LOW_RES, mode="area").movedim(1, -1)
    with torch.inference_mode():
        return ControlSyncLowPass.execute(small, vae or s.inference["vae"], method, space, weight).args[0], small


def latent_target(s, small, world=None, canvas_px=(64, 192)):
    """y in latent space, written here with ComfyUI's own functions: y stretched bicubically onto the canvas,
    VAE Encode (Tiled), the model's latent scaling, then torch's area resampling onto y's latent grid."""
    import comfy.utils
    world = world or s.inference
    with torch.inference_mode():
        big = comfy.utils.common_upscale(small.movedim(-1, 1), canvas_px[1], canvas_px[0], "bicubic", "disabled")
        (z,) = s.nodes.VAEEncodeTiled().encode(world["vae"], big.clamp(0, 1).movedim(1, -1), 512, 64)
        z = world["model"].model.process_latent_in(z["samples"].double())
    return torch.nn.functional.interpolate(z, size=(small.shape[1] // 8, small.shape[2] // 8), mode="area")


def sampled(s, latent, denoise, guide_settings=None, sync=None, steps=STEPS, world=None, callback_x0=None):
    world = world or s.inference
    with torch.inference_mode():
        out = s.Sampler.execute(world["model"], SEED, steps, 7.5, "euler", "normal", world["pos"], world["neg"], latent,
                                s.plan, denoise, 0, sync, guide_settings)
    return out.args[0]["samples"]


def low_pass_error(s, z, y):
    """||H z - y|| / ||y||, H = torch's area resampling onto y's latent grid."""
    low = torch.nn.functional.interpolate(s.inference["model"].model.process_latent_in(z.double()), size=y.shape[-2:],
                                          mode="area")
    return float((low - y).norm() / y.norm())


@pytest.mark.parametrize("denoise", [1.0, DENOISE])
def test_low_pass_guide_pulls_the_results_low_pass_to_y(s, encoded, denoise):
    """From noise (denoise 1) and in img2img (0.5 on the canvas encoded from the image): the result's latent
    averaged onto y's latent grid misses y's latent unguided; Replacement lands on it (float32 rounding), and
    Reconstruction (w 1) comes far closer than unguided."""
    empty = {"samples": torch.zeros(1, 4, 8, 24)}
    latent = empty if denoise == 1.0 else encoded
    settings, small = guide(s)
    y = latent_target(s, small)
    errors = {"none": low_pass_error(s, sampled(s, latent, denoise), y),
              "replacement": low_pass_error(s, sampled(s, latent, denoise, settings), y),
              "reconstruction": low_pass_error(s, sampled(s, latent, denoise, guide(s, "reconstruction")[0]), y)}
    print(f"[upscale] denoise {denoise}: ||H(result) - y|| / ||y||: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    # the tiny random model's x0 is far larger than y (from noise ~1000x, in img2img ~100x): float32 rounds at that
    # size, so the bounds scale with the unguided miss (measured: replacement 4e-5 / 7e-6, reconstruction 4e-5 /
    # 1.1e-4 of ||y||, unguided 1e3 / 1e2)
    assert errors["none"] > 10
    assert errors["replacement"] < 1e-6 * errors["none"]
    assert errors["reconstruction"] < 1e-5 * errors["none"]


def area_matrix(n, m):
    """Area downsampling of n cells onto m (an integer ratio here): each output cell the mean of n / m inputs."""
    k = n // m
    return torch.kron(torch.eye(m, dtype=torch.float64), torch.full((1, k), 1.0 / k, dtype=torch.float64))


def first_x0(s, world, guide_settings=None, shift=None):
    """The x0-prediction the sampler steps with at its first step (ComfyUI's sampler callback: after CFG and every
    correction), 4 euler steps from noise, the canvas moved by `shift` (model latent space) before the first step:
    x = noise sqrt(1 + sigma^2) + latent, so the latent carries the shift (divided by SD1.5's latent scale)."""
    import comfy.sample
    from controlsync.nodes.windowed_model import ControlSyncWindowedModel
    latent = torch.zeros(1, 4, 8, 24, dtype=torch.float64)
    if shift is not None:
        latent = world["model"].model.process_latent_out(shift)
    seen = {}
    with torch.inference_mode():
        windowed = ControlSyncWindowedModel.execute(world["model"], s.plan, 0, None, guide_settings).args[0]
        noise = comfy.sample.prepare_noise(latent, SEED).to(torch.float64)
        comfy.sample.sample(windowed, noise, 4, 7.5, "euler", "normal", world["pos"], world["neg"], latent, seed=SEED,
                            callback=lambda i, x0, x, n: seen.setdefault(i, x0.clone()), disable_pbar=True)
    return seen[0].to(torch.float64).clone()  # a plain tensor (cloned outside inference mode)


def test_replacement_and_reconstruction_are_the_papers_formulas_on_the_node(s, world64):
    """In float64 through ControlSync Windowed Model and ComfyUI's sampler, the first step's x0-prediction with the
    guide against the one without, H written here as a dense matrix, y in latent space as above:
    Replacement (Algorithm 4) is proj(x0) = H^+ y + (I - H^+ H) x0 with torch.linalg.pinv; Reconstruction
    (Algorithm 5, the pack's denoised form) subtracts c = (w / g) J^T H^T (H x0 - y), g = the largest eigenvalue
    of H H^T (eigvalsh), J the Jacobian of the merged CFG x0-prediction in x - checked along directions v as
    <c, v> = (w / g) <H^T (H x0 - y), J v>, J v by central differences of the unguided node's x0."""
    small = torch.nn.functional.interpolate(s.image.movedim(-1, 1).double(), size=LOW_RES, mode="area").movedim(1, -1)
    y = latent_target(s, small, world64).flatten(-2)
    M = torch.kron(area_matrix(8, 4), area_matrix(24, 12))
    P = torch.linalg.pinv(M)
    x0 = first_x0(s, world64)
    replaced = first_x0(s, world64, guide(s, image=small, vae=world64["vae"])[0])
    expected = y @ P.T + x0.flatten(-2) @ (torch.eye(M.shape[1], dtype=torch.float64) - P @ M).T
    scale = float(x0.abs().max())
    assert torch.allclose(replaced.flatten(-2), expected, rtol=0, atol=1e-9 * scale)
    assert float((replaced - x0).abs().max()) > 1e-3 * scale

    weight = 0.7
    c = x0 - first_x0(s, world64, guide(s, "reconstruction", weight=weight, image=small, vae=world64["vae"])[0])
    gain = float(torch.linalg.eigvalsh(M @ M.T).max())
    back = ((x0.flatten(-2) @ M.T - y) @ M).view_as(x0)  # H^T (H x0 - y)
    along_directions(s, world64, c, lambda jv: weight / gain * float((back * jv).sum()))


def along_directions(s, world, c, reference):
    """<c, v> against reference(J v) along c itself and a random direction, J v by central differences of the
    unguided node's first x0-prediction (relative to ||c||: float64 throughout, the differences' error ~1e-7)."""
    x0 = first_x0(s, world)
    g = torch.Generator().manual_seed(4)
    for v in (c / c.norm(), torch.randn(x0.shape, generator=g, dtype=torch.float64)):
        v = v / v.norm()
        eps = 1e-3 * float(x0.norm())
        jv = (first_x0(s, world, shift=eps * v) - first_x0(s, world, shift=-eps * v)) / (2 * eps)
        lhs, rhs = float((c * v).sum()), reference(jv)
        print(f"[upscale] along v: <c, v> {lhs:.6e}, the paper's {rhs:.6e}")
        assert abs(lhs - rhs) < 1e-5 * float(c.norm())


def test_pixel_space_reconstruction_is_the_papers_gradient_through_the_decoder(s, world64):
    """space 'pixels': H = area downsampling after the decoder (here one tile: the canvas is within the tile size).
    The first step's correction against the paper's gradient written here with autograd through the same VAE's
    decoder (plain float64 weights): e = J_dec^T A^T (A decode(x0) - y), c = (w / g) J^T e with g the Rayleigh
    quotient ||A J_dec e||^2 / ||e||^2 (torch.autograd.functional.jvp), the gain that is the paper's g where
    H H^T = g I."""
    plain = build_world(s, torch.float64, inference=False)
    small = torch.nn.functional.interpolate(s.image.movedim(-1, 1).double(), size=LOW_RES, mode="area").movedim(1, -1)
    y = small.movedim(-1, 1) * 2 - 1
    decoder, latent_format = plain["vae"].first_stage_model, plain["model"].model.latent_format

    def observe(z):
        return torch.nn.functional.interpolate(decoder.decode(latent_format.process_out(z)), size=LOW_RES, mode="area")
    x0 = first_x0(s, world64)
    weight = 0.7
    settings = guide(s, "reconstruction", "pixels", weight, image=small, vae=world64["vae"])[0]
    c = x0 - first_x0(s, world64, settings)
    z = x0.clone().requires_grad_(True)
    (e,) = torch.autograd.grad(0.5 * (observe(z) - y).pow(2).sum(), z)
    _, je = torch.autograd.functional.jvp(observe, x0, e)
    gain = float(je.pow(2).sum() / e.pow(2).sum())
    print(f"[upscale] pixels: gain {gain:.4e} (area alone: {1 / 4:.4f}), ||c|| {float(c.norm()):.4e}")
    along_directions(s, world64, c, lambda jv: weight / gain * float((e * jv).sum()))


def collage_plans():
    """Factor graphs of every kind but the chain (the window plan above is one): graph -> canvas (height, width) px."""
    return {"cycle": (64, 256), "grid": (128, 128), "corner_grid": (128, 192), "cubemap": (64, 384)}


@pytest.mark.parametrize("graph", list(collage_plans()))
def test_replacement_lands_on_y_on_every_plan_kind(s, graph):
    """Factor Graph Collage's graphs (a loop, grids, the 360 cubemap with its turned faces) with the guide at half
    the canvas (a cubemap's y: a strip of six half-size faces): unguided the result's low-pass misses y's;
    Replacement lands on it."""
    from controlsync.nodes.factor_graph_collage import FactorGraphCollage
    h, w = collage_plans()[graph]
    face = h if graph == "cubemap" else 64
    plan = FactorGraphCollage.execute(graph, face if graph == "cubemap" else w, h, 64, 64, 32, "horizontal", 0).args[0]
    image = s.tm.condition_image(h, w)
    small = torch.nn.functional.interpolate(image.movedim(-1, 1), size=(h // 2, w // 2), mode="area").movedim(1, -1)
    y = latent_target(s, small, canvas_px=(h, w))
    world = s.inference
    results = {}
    for method in ("none", "replacement"):
        settings = None if method == "none" else guide(s, method, image=small)[0]
        with torch.inference_mode():
            out = s.Sampler.execute(world["model"], SEED, 3, 7.5, "euler", "normal", world["pos_text"],
                                    world["neg_text"], {"samples": torch.zeros(1, 4, h // 8, w // 8)}, plan, 1.0, 0,
                                    None, settings)
        results[method] = low_pass_error(s, out.args[0]["samples"], y)
    print(f"[upscale] {graph}: ||H(result) - y|| / ||y||: none {results['none']:.2e}, replacement "
          f"{results['replacement']:.2e}")
    assert results["none"] > 0.05 and results["replacement"] < 1e-6 * max(results["none"], 1.0)


def test_guide_refusals_name_the_input(s):
    """What the guide cannot do is refused at the node, naming the input and what to do."""
    from controlsync.nodes.factor_graph_collage import FactorGraphCollage
    from controlsync.nodes.lowpass_guide import ControlSyncLowPass
    from controlsync.nodes.windowed_model import ControlSyncWindowedModel
    world = s.inference
    small = s.image[:, ::2, ::2]
    with pytest.raises(ValueError, match="method / space: .*pseudo-inverse.*decoder"):
        ControlSyncLowPass.execute(small, world["vae"], "replacement", "pixels", 1.0)
    with pytest.raises(ValueError, match="vae:"):
        ControlSyncLowPass.execute(small, None, "replacement", "latent", 1.0)
    settings = guide(s)[0]

    def sample(plan, settings, latent=None):
        with torch.inference_mode():
            s.Sampler.execute(world["model"], SEED, 2, 7.5, "euler", "normal", world["pos_text"], world["neg_text"],
                              latent or {"samples": torch.zeros(1, 4, 8, 24)}, plan, 1.0, 0, None, settings)
    ordered = FactorGraphCollage.execute("chain", 192, 64, 64, 64, 32, "horizontal", 0, order="autoregressive").args[0]
    with pytest.raises(ValueError, match="guide: .*autoregressive"):
        sample(ordered, settings)
    with pytest.raises(ValueError, match="guide: .*autoregressive"):
        ControlSyncWindowedModel.execute(world["model"], ordered, 0, None, settings)
    with pytest.raises(ValueError, match="guide: .*larger than the canvas"):
        sample(s.plan, guide(s, image=s.tm.condition_image(128, 256))[0])
    with pytest.raises(ValueError, match="guide: .*aspect"):
        sample(s.plan, guide(s, image=s.tm.condition_image(32, 80))[0])  # 80x32 onto 192x64: 2.4 latent cells off
    sample(s.plan, guide(s, image=s.tm.condition_image(32, 95))[0])  # 95x32: 2 px (a quarter cell) off: runs
    cubemap = FactorGraphCollage.execute("cubemap", 64, 64, 64, 64, 32, "horizontal", 0).args[0]
    with pytest.raises(ValueError, match="guide: .*cubemap.*6 times"):
        sample(cubemap, guide(s, image=s.tm.condition_image(32, 190))[0], {"samples": torch.zeros(1, 4, 8, 48)})
    with pytest.raises(ValueError, match="guide: space 'pixels' .* cubemap"):
        sample(cubemap, guide(s, "reconstruction", "pixels", image=s.tm.condition_image(32, 192))[0],
               {"samples": torch.zeros(1, 4, 8, 48)})


def test_pixel_space_reconstruction_pulls_the_decoded_low_pass_to_y(s):
    """space 'pixels' on a canvas two decoder tiles wide (384x64 px, tiles of 32 latent cells). The tiny random VAE
    decodes every latent to nearly one grey, so y is one it can reach: another picture encoded, decoded by VAE
    Decode and area-downsampled to half size. Sampled at img2img 0.5 (4 steps) from the canvas picture, the result
    decoded and area-downsampled comes closer to y than unguided (measured: 0.52 -> 0.36 of y's spread). One
    gradient step per sampler step, steepest descent through the decoder: slower than latent space, where H H^T =
    g I makes each step exact."""
    from controlsync.nodes.factor_graph_collage import FactorGraphCollage
    world = s.inference
    plan = FactorGraphCollage.execute("chain", 384, 64, 64, 64, 32, "horizontal", 0).args[0]
    with torch.inference_mode():
        (latent,) = s.nodes.VAEEncodeTiled().encode(world["vae"], s.tm.condition_image(64, 384), 512, 64)
        (other,) = s.nodes.VAEEncodeTiled().encode(world["vae"], s.tm.condition_image(64, 384, seed=9).flip(2), 512, 64)
        target = world["vae"].decode(other["samples"]).movedim(-1, 1)
    small = torch.nn.functional.interpolate(target, size=(32, 192), mode="area")
    errors = {}
    for name, settings in (("none", None), ("pixels", guide(s, "reconstruction", "pixels", image=small.movedim(1, -1))[0])):
        with torch.inference_mode():
            out = s.Sampler.execute(world["model"], SEED, 4, 7.5, "euler", "normal", world["pos_text"],
                                    world["neg_text"], latent, plan, DENOISE, 0, None, settings).args[0]
            decoded = world["vae"].decode(out["samples"]).movedim(-1, 1)
        low = torch.nn.functional.interpolate(decoded, size=(32, 192), mode="area")
        errors[name] = float((low - small).norm() / (small - small.mean()).norm())
    print(f"[upscale] pixels: ||A decode(result) - y|| / ||y - mean||: none {errors['none']:.3e}, "
          f"guided {errors['pixels']:.3e}")
    assert errors["pixels"] < 0.8 * errors["none"]


@pytest.mark.parametrize("method", ["replacement", "reconstruction"])
def test_upscale_combination_tile_controlnet_sync_from_the_run_and_guide(s, encoded, method):
    """The shipped workflow's combination at img2img 0.5: a tile ControlNet on the low-resolution image, Anchor Sync
    counted from the run, the guide. Sync still runs its first 2 of 10 steps (gradient passes counted on the real
    model; Reconstruction adds one per window and step); Replacement still lands on y; Reconstruction (at the windows' synced latents) still comes far closer
    than unguided."""
    world = s.inference
    settings, small = guide(s, method)
    with torch.inference_mode():
        pos, neg = s.nodes.ControlNetApplyAdvanced().apply_controlnet(world["pos_text"], world["neg_text"],
                                                                      s.tm.tiny_controlnet(7), small, 1.0, 0.0, 1.0)
        sync = s.Sync.execute(world["vae"], 20.0, 0.95, 10, "alex", "exact", count_from="run").args[0]
    record = []
    counted = world["model"].clone()
    counted.add_wrapper_with_key(s.pe.WrappersMP.APPLY_MODEL, "test.gradient_passes", gradient_pass_counter(record))
    results = {}
    for name, g in (("none", None), (method, settings)):
        record.clear()
        with torch.inference_mode():
            results[name] = s.Sampler.execute(counted, SEED, STEPS, 7.5, "euler", "normal", pos, neg, encoded, s.plan,
                                              DENOISE, 0, sync, g).args[0]["samples"]
        print(f"[upscale] {name}: {len(record)} gradient passes at sigmas {sorted(set(round(r, 4) for r in record))}")
        # the sync: the first 2 steps, each window but the anchor; Reconstruction: every step, every window
        windows = len(s.plan.layout((8, 24)).regions)
        assert len(record) == 2 * (windows - 1) + (STEPS * windows if name == "reconstruction" else 0)
    y = latent_target(s, small)
    errors = {k: low_pass_error(s, v, y) for k, v in results.items()}
    print(f"[upscale] tile ControlNet + sync (run) + {method}: ||H(result) - y|| / ||y||: " +
          ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    bound = 1e-6 * max(errors["none"], 1.0) if method == "replacement" else 1e-2 * errors["none"]
    assert errors["none"] > 0.05 and errors[method] < bound


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_sdxl_and_flux_tile_controlnets_on_the_low_resolution_input_get_each_windows_crop(s, family):
    """SDXL's ControlNet (pixel hint) and Flux's InstantX Union ControlNet in tile mode (VAE-encoded hint), tiny
    (tests/tiny_families.py), on the low-resolution input at 3/8 of the 192x64 canvas: a forward hook on the real
    module sees, per window, its crop of that image resized to the canvas as ComfyUI resizes hints - for Flux,
    ComfyUI's VAE encoding of that crop (each window is an image of its own)."""
    import comfy.utils
    import comfy_extras.nodes_controlnet as ncn
    import comfy_extras.nodes_flux as nflux
    import tiny_families as tf
    small = torch.nn.functional.interpolate(s.image.movedim(-1, 1), size=(24, 72), mode="area").movedim(1, -1)
    with torch.inference_mode():
        model, vae = tf.model(family), tf.vae(family)
        if family == "sdxl":
            control, cfg = tf.sdxl_controlnet(), 7.5
            pos, neg = tf.text_cond(family, 10), tf.text_cond(family, 11)
        else:
            control = ncn.SetUnionControlNetType().set_controlnet_type(tf.flux_controlnet("union"), "tile")[0]
            pos, cfg = nflux.FluxGuidance.execute(tf.text_cond(family, 10, guidance=None), 3.5).args[0], 1.0
            neg = s.nodes.ConditioningZeroOut().zero_out(pos)[0]
        pos, neg = s.nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, control, small, 1.0, 0.0, 1.0, vae=vae)
        channels = model.model.latent_format.latent_channels
        (encoded,) = s.nodes.VAEEncodeTiled().encode(vae, s.image, 512, 64)
    hints = []
    handle = control.control_model.register_forward_hook(lambda m, a, kw, out: hints.append(kw["hint"].clone()),
                                                         with_kwargs=True)
    try:
        with torch.inference_mode():
            s.Sampler.execute(model, SEED, 1, cfg, "euler", "simple", pos, neg, encoded, s.plan, DENOISE, 1)
    finally:
        handle.remove()
    assert encoded["samples"].shape[1] == channels
    canvas = comfy.utils.common_upscale(small.movedim(-1, 1), 192, 64, control.upscale_algorithm, "center")
    starts = [0, 32, 64, 96, 128]
    assert len(hints) == len(starts)
    for hint, x0 in zip(hints, starts):
        crop = canvas[..., x0:x0 + 64]
        if family == "flux":
            with torch.inference_mode():
                crop = control.latent_format.process_in(vae.encode(crop.movedim(1, -1)))
        assert torch.equal(hint[0], crop[0].to(hint.dtype)), (family, x0)
