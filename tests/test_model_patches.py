"""ComfyUI 0.33's model-patch ControlNets under ControlSync windows: each window's call of the patch gets that
window's own VAE encoding of its crop of the control image (forward hooks on the patch's own network), batches
of windows get theirs stacked, a one-window plan is ComfyUI's own run bit for bit, the gradient passes run
through the patch, nothing of the user's patch changes, and the spatial patches that are not cut are refused.
Tiny models from 0.33's configs (tests/tiny_033.py)."""
from __future__ import annotations

import pytest
import torch

H, W, WINDOW, STRIDE = 64, 192, 64, 32   # pixels
STARTS = [0, 32, 64, 96, 128]            # window starts, pixels


@pytest.fixture(scope="module")
def m(comfy):
    import comfy.latent_formats
    import comfy.utils
    import comfy_extras.nodes_model_patch as mp
    import nodes
    import tiny_models as tm
    import tiny_033 as tp
    from controlsync.nodes.controlsync_sampler import ControlSyncSampler
    from controlsync.nodes.window_planner import WindowPlanner

    class M:
        pass
    m = M()
    m.mp, m.nodes, m.utils, m.tp, m.formats = mp, nodes, comfy.utils, tp, comfy.latent_formats
    m.Sampler, m.Planner = ControlSyncSampler, WindowPlanner
    m.image = tm.condition_image(H, W)
    m.inpaint = tm.condition_image(H, W, seed=9)
    m.mask = torch.zeros(1, H, W)
    m.mask[:, 16:48, 40:150] = 1.0
    with torch.inference_mode():
        m.qwen, m.wan_vae = tp.qwen(), tp.wan_vae()
        m.zimage, m.flux_vae = tp.zimage(), tp.flux_vae()
        m.pos, m.neg = tp.text_cond(10), tp.text_cond(11)
    return m


def plan(m, window=WINDOW, stride=STRIDE):
    return m.Planner.execute(W, H, window, H, stride, "first", 0, "uniform", image=m.image).args[0]


def latent(family):
    return {"samples": torch.zeros((1, 16, 1, H // 8, W // 8) if family == "qwen" else (1, 16, H // 8, W // 8))}


def sample(m, model, family, p=None, batch=1, steps=1, sync=None, seed=5):
    with torch.inference_mode():
        return m.Sampler.execute(model, seed, steps, 4.0, "euler", "simple", m.pos, m.neg, latent(family), p or plan(m),
                                 1.0, batch, sync).args[0]["samples"]


def diffsynth(m, inpaint=False):
    with torch.inference_mode():
        net = m.tp.diffsynth_controlnet(inpaint=inpaint)
        model = m.mp.QwenImageDiffsynthControlnet().diffsynth_controlnet(m.qwen, net, m.wan_vae, m.image, 1.0,
                                                                        mask=m.mask if inpaint else None)[0]
    return model, net


def zimage_fun(m, version="1"):
    with torch.inference_mode():
        net = m.tp.zimage_controlnet(version=version)
        extra = dict(inpaint_image=m.inpaint, mask=m.mask) if version == "2.1" else {}
        model = m.mp.ZImageFunControlnet().diffsynth_controlnet(m.zimage, net, m.flux_vae, m.image, 1.0, **extra)[0]
    return model, net


def canvas_px(m, image):
    """The image as the patches resize it for a full-canvas call ("area", centre crop), (B, C, H, W)."""
    return m.utils.common_upscale(image.movedim(-1, 1), W, H, "area", "center")


def diffsynth_reference(m, net, x0, inpaint):
    """Window x0's conditioning tokens: its crop of the canvas image through the VAE and the patch network's input
    layer; with the inpainting variant the mask stretched to the canvas latent ("bilinear"), cropped, concatenated."""
    with torch.inference_mode():
        z = m.wan_vae.encode(canvas_px(m, m.image)[..., x0:x0 + WINDOW].movedim(1, -1))
        if inpaint:
            stretched = m.utils.common_upscale((1.0 - m.mask)[:, None, None], W // 8, H // 8, "bilinear", "none")
            z = torch.cat([z, stretched[..., x0 // 8:(x0 + WINDOW) // 8]], dim=1)
        return net.model.process_input_latent_image(z)


def zimage_reference(m, x0, version):
    """Window x0's control latent: its crop through the VAE in Flux's latent format; v2.1 adds the crop's mask cell
    (the canvas-sized mask sampled per latent cell) and the masked inpaint image's latent."""
    flux = m.formats.Flux()
    with torch.inference_mode():
        crop = lambda t: t[..., x0:x0 + WINDOW]  # noqa: E731
        z = flux.process_in(m.flux_vae.encode(crop(canvas_px(m, m.image)).movedim(1, -1)))
        if version == "1":
            return z
        keep = crop(1.0 - m.mask)[:, None]  # the node applies 1 - mask
        masked = (crop(canvas_px(m, m.inpaint)) - 0.5) * keep.round() + 0.5
        inpaint = flux.process_in(m.flux_vae.encode(masked.movedim(1, -1)))
        return torch.cat([z, keep[..., ::8, ::8], inpaint], dim=1)


def record(module, index=1):
    seen = []
    handle = module.register_forward_hook(lambda mod, args, out: seen.append(args[index].clone()))
    return seen, handle


# --- each window gets its crop ----------------------------------------------------------------------

@pytest.mark.parametrize("inpaint", [False, True], ids=["control", "inpaint-mask"])
def test_diffsynth_controlnet_gets_each_windows_crop(m, inpaint):
    """Qwen-Image DiffSynth: a hook on the patch's first control block records its conditioning tokens per call."""
    model, net = diffsynth(m, inpaint)
    seen, handle = record(net.model.controlnet_blocks[0])
    try:
        sample(m, model, "qwen")
    finally:
        handle.remove()
    assert len(seen) == len(STARTS)
    with torch.inference_mode():  # what every window got before: the canvas image's centre, squashed
        squashed = None if inpaint else net.model.process_input_latent_image(m.wan_vae.encode(
            m.utils.common_upscale(m.image.movedim(-1, 1), WINDOW, WINDOW, "area", "center").movedim(1, -1)))
    for x0, tokens in zip(STARTS, seen):
        ref = diffsynth_reference(m, net, x0, inpaint)
        for chunk in tokens.chunk(tokens.shape[0]):   # cond and uncond
            assert torch.equal(chunk, ref)
        if squashed is not None and x0 != (W - WINDOW) // 2:
            assert (tokens[:1] - squashed).abs().max() > 1e-3 * squashed.abs().max()


@pytest.mark.parametrize("version", ["1", "2.1"], ids=["v1", "v2.1-inpaint"])
def test_zimage_fun_controlnet_gets_each_windows_crop(m, version):
    """Z-Image Fun ControlNet: a hook on the patch network records the control latent it embeds per call."""
    model, net = zimage_fun(m, version)
    seen, handle = record(net.model)
    try:
        sample(m, model, "zimage")
    finally:
        handle.remove()
    assert len(seen) == len(STARTS)
    for x0, control in zip(STARTS, seen):
        ref = zimage_reference(m, x0, version)
        for chunk in control.chunk(control.shape[0]):
            assert torch.equal(chunk, ref)


@pytest.mark.parametrize("kind", ["diffsynth", "zimage"])
def test_batched_windows_get_their_crops_stacked(m, kind):
    """Two windows per call: the patch sees cond and uncond chunks of both windows' encodings in ComfyUI's order,
    and the sample equals one window per call (float reassociation only)."""
    model, net = diffsynth(m) if kind == "diffsynth" else zimage_fun(m)
    family = "qwen" if kind == "diffsynth" else "zimage"
    seen, handle = record(net.model.controlnet_blocks[0] if kind == "diffsynth" else net.model)
    try:
        batched = sample(m, model, family, batch=2, steps=2)
    finally:
        handle.remove()
    one = sample(m, model, family, batch=1, steps=2)
    assert (batched - one).abs().max() <= 1e-5 * one.abs().max()
    ref = diffsynth_reference if kind == "diffsynth" else None
    refs = [ref(m, net, x0, False) if ref else zimage_reference(m, x0, "1") for x0 in STARTS[:2]]
    assert seen[0].shape[0] == 4  # (cond, uncond) x (window 0, window 1)
    for got, want in zip(seen[0].chunk(4), refs * 2):
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["diffsynth", "zimage"])
def test_one_window_plan_equals_comfyui_with_the_patch_bit_for_bit(m, kind):
    model, _ = diffsynth(m, True) if kind == "diffsynth" else zimage_fun(m, "2.1")
    family = "qwen" if kind == "diffsynth" else "zimage"
    ours = sample(m, model, family, p=plan(m, window=W, stride=8), steps=2)
    with torch.inference_mode():
        theirs = m.nodes.common_ksampler(model, 5, 2, 4.0, "euler", "simple", m.pos, m.neg, latent(family))[0]["samples"]
    assert torch.equal(ours, theirs)


# --- gradient passes, leaks, refusals --------------------------------------------------------------

def test_anchor_sync_runs_through_the_patch_with_each_windows_crop(m):
    """Exact AnchorSync differentiates through the Z-Image Fun patch (its network's weights aliased for autograd,
    comfy-kitchen's RoPE kernel swapped for its differentiable form); the gradient passes' calls get the crops
    too, and the patch network's weights are the user's inference tensors again afterwards."""
    import comfy.model_management
    import lpips_weights
    from controlsync.nodes.anchor_sync import AnchorSync
    lpips_weights.use_cached_backbones()
    model, net = zimage_fun(m)
    weights = dict(net.model.state_dict(keep_vars=True))
    with torch.inference_mode():
        sync = AnchorSync.execute(m.flux_vae, 20.0, 0.95, 50, "alex", "exact").args[0]
    seen, handle = record(net.model)
    try:
        synced = sample(m, model, "zimage", steps=2, sync=sync)
    finally:
        handle.remove()
    plain = sample(m, model, "zimage", steps=2)
    assert (synced - plain).abs().max() > 1e-4 * plain.abs().max()
    refs = [zimage_reference(m, x0, "1") for x0 in STARTS]
    assert len(seen) > 2 * len(STARTS)  # gradient passes, anchor and denoising calls
    windows = [[i for i, r in enumerate(refs) if torch.equal(control[:1], r)] for control in seen]
    assert all(len(w) == 1 for w in windows) and {w[0] for w in windows} == set(range(len(STARTS)))
    assert comfy.model_management.in_training is False
    after = net.model.state_dict(keep_vars=True)
    assert all(after[k] is v and v.is_inference() for k, v in weights.items())


def test_the_users_patch_is_untouched_after_success_error_and_cancel(m):
    import comfy.model_management as mm
    import comfy.patcher_extension as pe
    model, _ = zimage_fun(m, "2.1")
    (patch,) = model.model_options["transformer_options"]["patches"]["double_block"]
    state = lambda: {k: id(v) for k, v in vars(patch).items()}  # noqa: E731
    before, options = state(), repr(model.model_options)
    sample(m, model, "zimage")
    assert state() == before and repr(model.model_options) == options

    def boom(executor, *args, **kwargs):
        raise RuntimeError("boom")
    failing = model.clone()
    failing.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test.boom", boom)
    with pytest.raises(RuntimeError, match="boom"):
        sample(m, failing, "zimage")

    def cancel(executor, *args, **kwargs):
        mm.interrupt_current_processing(True)
        return executor(*args, **kwargs)
    cancelled = model.clone()
    cancelled.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test.cancel", cancel)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            sample(m, cancelled, "zimage")
    finally:
        mm.interrupt_current_processing(False)
    assert state() == before and repr(model.model_options) == options


@pytest.mark.parametrize("kind,needle", [
    ("supir", "SUPIR"), ("uni3c", "Uni3C"), ("anima", "Anima LLLite"),
])
def test_spatial_patches_that_are_not_cut_are_refused_at_the_sampler(m, kind, needle):
    """ComfyUI's own patch objects, registered as their nodes register them (their networks are not needed to be
    refused)."""
    import comfy.ldm.anima.lllite
    from comfy.ldm.supir.supir_patch import SUPIRPatch
    model = m.qwen.clone()
    if kind == "supir":
        SUPIRPatch(None, None, torch.zeros(1, 4, H // 8, W // 8), 1.0, 1.0).register(model)
    elif kind == "uni3c":
        model.set_model_double_block_patch(m.mp.WanUni3CCnetPatch(None, m.image, None, None, 1.0, 1.0, 0.0))
    else:
        model.set_model_post_input_patch(comfy.ldm.anima.lllite.AnimaLLLitePatch(None, m.image, None, 1.0, 1.0, 0.0))
    with pytest.raises(ValueError, match=needle):
        sample(m, model, "qwen")
