"""Upscaling on the real node (ComfyUI, tiny seeded SD1.5 model, ControlNet and VAE): img2img at denoise < 1 on a
canvas encoded with ComfyUI's own tiled VAE encode, with Anchor Sync counted from the steps that run."""
from __future__ import annotations

import pytest
import torch

from test_sync import s  # noqa: F401  (the shared fixture: a 192x64 canvas of five 64 px windows, stride 32)
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
