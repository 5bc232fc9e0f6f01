"""ControlSyncSampler and the windowed model inside a real ComfyUI (its samplers, ControlNets, conds)
with tiny seeded models built from config."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def w(comfy):
    """The pack, ComfyUI modules and a tiny SD1.5 world with two stacked ControlNets."""
    import comfy.patcher_extension
    import comfy.samplers
    import nodes
    import tiny_models as tm
    from controlsync.nodes.controlsync_sampler import ControlSyncSampler
    from controlsync.nodes.window_planner import WindowPlanner
    from controlsync.nodes.windowed_model import ControlSyncWindowedModel

    class W:
        pass
    w = W()
    w.nodes, w.samplers, w.pe, w.tm = nodes, comfy.samplers, comfy.patcher_extension, tm
    w.Planner, w.Sampler, w.Windowed = WindowPlanner, ControlSyncSampler, ControlSyncWindowedModel
    with torch.inference_mode():
        w.model = tm.tiny_model(0)
        w.cn1, w.cn2 = tm.tiny_controlnet(1), tm.tiny_controlnet(2)
        w.image = tm.condition_image(64, 192)
        pos, neg = tm.text_cond(10), tm.text_cond(11)
        apply = nodes.ControlNetApplyAdvanced().apply_controlnet
        pos, neg = apply(pos, neg, w.cn1, w.image, 0.9, 0.0, 1.0)
        w.pos, w.neg = apply(pos, neg, w.cn2, w.image.flip(2), 0.6, 0.1, 0.8)  # stacked, with a percent range
    w.latent = {"samples": torch.zeros(1, 4, 8, 24)}
    return w


def plan(w, window=64, stride=32, **kw):
    return w.Planner.execute(192, 64, window, 64, stride, kw.get("anchor", "first"), 0, kw.get("blend", "uniform"),
                             image=kw.get("image", w.image)).args[0]


def run(w, plan_, model=None, pos=None, neg=None, latent=None, sampler="euler", scheduler="normal", steps=3, cfg=7.5,
        denoise=1.0, batch=0, seed=5):
    with torch.inference_mode():
        return w.Sampler.execute(model or w.model, seed, steps, cfg, sampler, scheduler, pos or w.pos, neg or w.neg,
                                 latent or w.latent, plan_, denoise, batch).args[0]["samples"]


def ksampler(w, model=None, pos=None, neg=None, latent=None, sampler="euler", scheduler="normal", steps=3, cfg=7.5,
             denoise=1.0, seed=5):
    with torch.inference_mode():
        return w.nodes.common_ksampler(model or w.model, seed, steps, cfg, sampler, scheduler, pos or w.pos,
                                       neg or w.neg, latent or w.latent, denoise=denoise)[0]["samples"]


def full_window(w):
    return plan(w, window=192, stride=8)


# --- exactness anchors ---------------------------------------------------------------------------

@pytest.mark.parametrize("sampler,scheduler", [("euler", "normal"), ("ddim", "ddim_uniform"), ("dpmpp_2m", "karras"),
                                               ("euler_ancestral", "simple"), ("uni_pc", "sgm_uniform")])
def test_one_full_window_equals_ksampler_bit_for_bit(w, sampler, scheduler):
    ours = run(w, full_window(w), sampler=sampler, scheduler=scheduler)
    ref = ksampler(w, sampler=sampler, scheduler=scheduler)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("case", ["batch2", "cfg1", "denoise", "noise_mask"])
def test_one_full_window_equals_ksampler_in_the_must_work_cases(w, case):
    latent, kw = w.latent, {}
    if case == "batch2":
        latent = {"samples": torch.zeros(2, 4, 8, 24)}
    elif case == "cfg1":
        kw["cfg"] = 1.0
    else:
        g = torch.Generator().manual_seed(4)
        latent = {"samples": torch.randn(1, 4, 8, 24, generator=g)}
        kw["denoise"] = 0.55
        if case == "noise_mask":
            mask = torch.zeros(1, 64, 192)
            mask[:, :, 60:150] = 1
            latent["noise_mask"] = mask
    ours = run(w, full_window(w), latent=latent, **kw)
    assert torch.equal(ours, ksampler(w, latent=latent, **kw))
    windows = run(w, plan(w), latent=latent, **kw)
    assert windows.shape == latent["samples"].shape and bool(torch.isfinite(windows).all())
    if case == "noise_mask":  # cells outside the mask keep the input latent exactly, as in KSampler
        keep = latent["samples"][..., :7]
        assert torch.allclose(windows[..., :7], keep, rtol=0, atol=1e-5)
        assert torch.allclose(ours[..., :7], keep, rtol=0, atol=1e-5)
    if case == "batch2":  # different noise per batch item, as in KSampler
        assert not torch.equal(windows[0], windows[1])


def test_same_seed_same_bits_and_other_seed_differs(w):
    p = plan(w)
    a, b = run(w, p), run(w, p)
    assert torch.equal(a, b)
    assert not torch.equal(a, run(w, p, seed=6))


def test_batched_windows_equal_sequential_windows(w):
    p = plan(w, window=64, stride=16)
    seq = run(w, p, batch=1)
    for batch in (2, 3, 0):
        out = run(w, p, batch=batch)
        assert (out - seq).abs().max() <= 1e-5 * seq.abs().max(), batch  # float reassociation only


def _recorder(log):
    def wrapper(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        log.append((args, [o.clone() for o in out]))
        return out
    return wrapper


def test_hint_reaching_each_window_is_the_crop_of_the_canvas_hint(w):
    """A forward hook on the real ControlNet module records the hint it gets for every window."""
    import comfy.utils
    hints = []
    handle = w.cn1.control_model.register_forward_hook(lambda m, a, kw, out: hints.append(kw["hint"].clone()),
                                                       with_kwargs=True)
    big = torch.nn.functional.interpolate(w.image.movedim(-1, 1), scale_factor=2.0, mode="bilinear").movedim(1, -1)
    with torch.inference_mode():
        pos, neg = w.nodes.ControlNetApplyAdvanced().apply_controlnet(w.tm.text_cond(10), w.tm.text_cond(11), w.cn1, big,
                                                                      1.0, 0.0, 1.0)
    p = plan(w, window=64, stride=32)
    try:
        run(w, p, pos=pos, neg=neg, steps=1, batch=1)
    finally:
        handle.remove()
    canvas_hint = comfy.utils.common_upscale(big.movedim(-1, 1), 192, 64, w.cn1.upscale_algorithm, "center")
    starts = [0, 32, 64, 96, 128]
    assert len(hints) == len(starts)
    for x0, hint in zip(starts, hints):
        assert hint.shape[-2:] == (64, 64)
        assert torch.equal(hint[0], canvas_hint[0, :, :, x0:x0 + 64].to(hint.dtype))


def test_merged_prediction_equals_independent_weighted_average(w):
    """Per-window outputs are recorded below our wrapper, the merged canvas above it."""
    for blend in ("uniform", "feather"):
        p = plan(w, window=64, stride=24, blend=blend)
        inner, outer = [], []
        base = w.model.clone()
        base.add_wrapper_with_key(w.pe.WrappersMP.CALC_COND_BATCH, "test.outer", _recorder(outer))
        windowed = w.Windowed.execute(base, p, 1).args[0]
        windowed.add_wrapper_with_key(w.pe.WrappersMP.CALC_COND_BATCH, "test.inner", _recorder(inner))
        ksampler(w, model=windowed, steps=2)
        layout = p.layout((8, 24), 8)
        n = len(layout.regions)
        assert len(inner) == 2 * n and len(outer) == 2
        ramp = layout.feather
        for step in range(2):
            merged = outer[step][1]
            num = [torch.zeros_like(m, dtype=torch.float64) for m in merged]
            den = torch.zeros(8, 24, dtype=torch.float64)
            for i, region in enumerate(layout.regions):
                y, x, h, ww = region.rect
                outs = inner[step * n + i][1]
                weight = torch.tensor([[1.0 if ramp == 0 else min(1.0, (min(a, h - 1 - a, b, ww - 1 - b) + 1) / (ramp + 1))
                                        for b in range(ww)] for a in range(h)], dtype=torch.float64)
                for c, o in enumerate(outs):
                    num[c][..., y:y + h, x:x + ww] += o.double() * weight
                den[y:y + h, x:x + ww] += weight
            for c in range(len(merged)):
                assert torch.allclose(merged[c].double(), num[c] / den, atol=1e-5)


# --- every sampler and scheduler --------------------------------------------------------------

def test_every_ksampler_sampler_runs_windowed(w, comfy):
    """Every sampler KSampler offers, without sync: tests/test_samplers_sync.py's sweep runs each of them
    windowed (with and without sync) and fails on one it does not list; here the two it refuses to sync."""
    from test_samplers_sync import REFUSED, SAMPLERS
    assert set(w.samplers.KSampler.SAMPLERS) <= set(SAMPLERS) | set(REFUSED)
    p = plan(w, window=128, stride=64)
    failures = []
    for name in REFUSED:
        try:
            out = run(w, p, sampler=name, steps=3)
            if not bool(torch.isfinite(out).all()):
                failures.append((name, "non-finite"))
        except Exception as e:  # collect all failures for one clear report
            failures.append((name, repr(e)[:200]))
    assert not failures


def test_every_scheduler_runs_windowed(w):
    p = plan(w, window=128, stride=64)
    for name in w.samplers.KSampler.SCHEDULERS:
        assert bool(torch.isfinite(run(w, p, scheduler=name, steps=3)).all()), name


# --- custom sampling (SamplerCustomAdvanced) ---------------------------------------------------

def test_windowed_model_in_sampler_custom_advanced_equals_controlsync_sampler(w):
    import comfy_extras.nodes_custom_sampler as cs
    p = plan(w)
    with torch.inference_mode():
        model = w.Windowed.execute(w.model, p, 0).args[0]
        guider = cs.CFGGuider().get_guider(model, w.pos, w.neg, 7.5)[0]
        sampler = cs.KSamplerSelect().get_sampler("dpmpp_2m")[0]
        sigmas = cs.BasicScheduler().get_sigmas(model, "karras", 3, 1.0)[0]
        noise = cs.RandomNoise().get_noise(5)[0]
        out = cs.SamplerCustomAdvanced().sample(noise, guider, sampler, sigmas, w.latent)[0]["samples"]
    assert torch.equal(out, run(w, p, sampler="dpmpp_2m", scheduler="karras"))
    assert not w.model.get_wrappers(w.pe.WrappersMP.CALC_COND_BATCH, "controlsync.windows")


# --- SDXL architecture -------------------------------------------------------------------------

def test_tiny_sdxl_with_size_conditioning(w):
    tm = w.tm
    with torch.inference_mode():
        model = tm.tiny_model(0, arch="sdxl")
        cn = tm.tiny_controlnet(3, arch="sdxl")
        pos, neg = w.nodes.ControlNetApplyAdvanced().apply_controlnet(tm.text_cond(1, arch="sdxl"),
                                                                       tm.text_cond(2, arch="sdxl"), cn, w.image, 1.0, 0.0, 1.0)
    assert model.model.adm_channels == 2816
    ours = run(w, full_window(w), model=model, pos=pos, neg=neg)
    assert torch.equal(ours, ksampler(w, model=model, pos=pos, neg=neg))
    windows = run(w, plan(w), model=model, pos=pos, neg=neg)
    assert bool(torch.isfinite(windows).all()) and not torch.equal(windows, ours)


# --- area and mask conditioning: per window ----------------------------------------------------

def _area_and_mask_conds(w):
    import node_helpers
    base = w.tm.text_cond(20)
    area = node_helpers.conditioning_set_values(w.tm.text_cond(21), {"area": (64 // 8, 64 // 8, 0, 120 // 8),
                                                                      "strength": 1.0, "set_area_to_bounds": False})
    mask = torch.zeros(1, 64, 192)
    mask[:, 16:48, 20:90] = 1.0
    masked = node_helpers.conditioning_set_values(w.tm.text_cond(22), {"mask": mask, "set_area_to_bounds": False,
                                                                        "mask_strength": 1.0})
    return base + area + masked


WINDOW_RECTS = [(0, x, 8, 8) for x in (0, 4, 8, 12, 16)]  # plan(w): 64 px windows every 32 px over 192x64


def _window_conds(cond_list, rect):
    """A cond list as one window should see it, cut here: areas (h, w, y, x) intersected with the window in
    its coordinates (conds whose area misses the window dropped), masks cropped to it."""
    y, x, h, w = rect
    out = []
    for d in cond_list:
        d = dict(d)
        if "area" in d:
            ah, aw, ay, ax = d["area"]
            y0, y1, x0, x1 = max(ay, y), min(ay + ah, y + h), max(ax, x), min(ax + aw, x + w)
            if y1 <= y0 or x1 <= x0:
                continue
            d["area"] = (y1 - y0, x1 - x0, y0 - y, x0 - x)
        if d.get("mask") is not None:
            d["mask"] = d["mask"][..., y:y + h, x:x + w]
        out.append(d)
    return out


def test_area_and_mask_conditioning_work_per_window(w):
    """Above the windowed model, the canvas prediction of the first step equals MultiDiffusion computed here
    with ComfyUI's own cond batching (comfy.samplers._calc_cond_batch) on every window's latent, with the area
    cond intersected with the window and the mask cond cropped to it, averaged per cell."""
    import comfy.samplers
    pos, neg = _area_and_mask_conds(w), w.tm.text_cond(11)
    assert torch.equal(run(w, full_window(w), pos=pos, neg=neg), ksampler(w, pos=pos, neg=neg))
    checked = []

    def reference(executor, model, conds, x, timestep, model_options, *args, **kwargs):
        out = executor(model, conds, x, timestep, model_options, *args, **kwargs)
        if not checked:
            assert any("area" in d for d in conds[0]) and any(d.get("mask") is not None for d in conds[0])
            total = [torch.zeros_like(o) for o in out]
            count = torch.zeros(x.shape[-2:], dtype=x.dtype)
            for rect in WINDOW_RECTS:
                y0, x0, h, ww = rect
                parts = comfy.samplers._calc_cond_batch(model, [_window_conds(c, rect) for c in conds],
                                                        x[..., y0:y0 + h, x0:x0 + ww], timestep, model_options)
                for t, p in zip(total, parts):
                    t[..., y0:y0 + h, x0:x0 + ww] += p
                count[y0:y0 + h, x0:x0 + ww] += 1
            for o, t in zip(out, total):
                checked.append(float((o - t / count).abs().max() / o.abs().max()))
        return out
    base = w.model.clone()
    base.add_wrapper_with_key(w.pe.WrappersMP.CALC_COND_BATCH, "test.reference", reference)
    windows = run(w, plan(w), model=base, pos=pos, neg=neg)
    assert bool(torch.isfinite(windows).all()) and len(checked) == 2
    assert max(checked) < 1e-5, checked
    # the area and mask conds change the result (they really reach the windows)
    assert not torch.equal(windows, run(w, plan(w), pos=w.tm.text_cond(20), neg=neg))


# --- nothing leaks -----------------------------------------------------------------------------

def _snapshot(w):
    def control_state(c):
        out = []
        while c is not None:
            out.append({k: (v if isinstance(v, (int, float, str, tuple, type(None))) else id(v)) for k, v in vars(c).items()})
            c = c.previous_controlnet
        return out
    return {
        "options": repr(w.model.model_options),
        "wrappers": repr(w.model.wrappers), "callbacks": repr(w.model.callbacks),
        "patches": repr(w.model.patches), "uuid": w.model.patches_uuid,
        "weights": {k: v.clone() for k, v in w.model.model.state_dict().items()},
        "cn_weights": {k: v.clone() for k, v in w.cn1.control_model.state_dict().items()},
        "controls": [control_state(d[1]["control"]) for d in w.pos + w.neg],
        "conds": [id(d[0]) for d in w.pos + w.neg] + [sorted(d[1]) for d in w.pos + w.neg],
    }


def _assert_same(before, after):
    for key in before:
        if key in ("weights", "cn_weights"):
            assert before[key].keys() == after[key].keys()
            assert all(torch.equal(before[key][k], after[key][k]) for k in before[key]), key
        else:
            assert before[key] == after[key], key


class _Boom(RuntimeError):
    pass


def _failing_after(calls, exc_factory):
    count = [0]

    def wrapper(executor, *args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise exc_factory()
        return executor(*args, **kwargs)
    return wrapper


def test_nothing_leaks_after_success_error_and_interrupt(w):
    import comfy.model_management as mm
    reference = ksampler(w)
    before = _snapshot(w)
    p = plan(w)
    run(w, p)
    _assert_same(before, _snapshot(w))

    # an error raised inside the windowed model calls, mid-run
    base = w.model.clone()
    base.add_wrapper_with_key(w.pe.WrappersMP.APPLY_MODEL, "test.boom", _failing_after(1, lambda: _Boom("boom")))
    with pytest.raises(_Boom):
        run(w, p, model=base)
    _assert_same(before, _snapshot(w))

    # the user pressing Cancel mid-run: ComfyUI's interrupt flag, checked before every window batch
    def interrupt(executor, *args, **kwargs):
        mm.interrupt_current_processing(True)
        return executor(*args, **kwargs)
    base = w.model.clone()
    base.add_wrapper_with_key(w.pe.WrappersMP.APPLY_MODEL, "test.cancel", interrupt)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(w, p, model=base, batch=1)
    finally:
        mm.interrupt_current_processing(False)
    _assert_same(before, _snapshot(w))
    assert torch.equal(ksampler(w), reference)


# --- bad input: clear errors at the node ---------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (dict(width=3072, height=512, window_width=4096, window_height=512, stride=64), "window_width = 4096 px is larger"),
    (dict(width=3072, height=512, window_width=512, window_height=512, stride=600), "stride = 600 px is larger than window_height"),
    (dict(width=3068, height=512, window_width=512, window_height=512, stride=64), "width must be a positive multiple of 8"),
])
def test_planner_bad_sizes(w, args, needle):
    with pytest.raises(ValueError, match=needle):
        w.Planner.execute(args["width"], args["height"], args["window_width"], args["window_height"], args["stride"],
                          "first", 0, "uniform")


def test_planner_takes_canvas_from_latent_then_image_and_draws_preview(w):
    p, preview, latent = w.Planner.execute(3072, 512, 64, 64, 32, "middle", 0, "uniform", image=w.image).args
    assert p.canvas_px == (64, 192) and latent["samples"].shape == (1, 4, 8, 24)
    assert preview.shape == (1, 64, 192, 3) and not torch.equal(preview[0], w.image[0])
    lat = {"samples": torch.zeros(1, 4, 16, 40)}
    p2, _, latent2 = w.Planner.execute(3072, 512, 64, 64, 32, "first", 0, "uniform", latent=lat).args
    assert p2.canvas_px == (128, 320) and latent2 is lat
    with pytest.raises(ValueError, match="condition image is 192x64.*canvas is 640x128"):
        w.Planner.execute(3072, 512, 64, 64, 32, "first", 0, "uniform", image=w.image,
                          latent={"samples": torch.zeros(1, 4, 16, 80)})
    with pytest.raises(ValueError, match="anchor_index 50 is past the last window"):
        w.Planner.execute(3072, 512, 512, 512, 64, "index", 50, "uniform")


def test_plan_for_another_canvas_is_refused_at_the_sampler(w):
    other = w.Planner.execute(256, 64, 64, 64, 32, "first", 0, "uniform").args[0]
    with pytest.raises(ValueError, match="made for a 256x64 px canvas"):
        run(w, other)


def test_condition_image_with_another_aspect_is_refused(w):
    with torch.inference_mode():
        pos, neg = w.nodes.ControlNetApplyAdvanced().apply_controlnet(w.tm.text_cond(1), w.tm.text_cond(2), w.cn1,
                                                                      w.tm.condition_image(64, 128), 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="condition image is 128x64.*canvas is 192x64"):
        run(w, plan(w), pos=pos, neg=neg)


def test_context_windows_and_double_windowing_are_refused(w):
    import comfy_extras.nodes_context_windows as ctx
    p = plan(w)
    with_ctx = ctx.ContextWindowsManualNode.execute(w.model, context_length=16, context_overlap=4,
                                                    context_schedule="standard_static", context_stride=1,
                                                    closed_loop=False, fuse_method="pyramid", dim=0,
                                                    freenoise=False).args[0]
    with pytest.raises(ValueError, match="context windows are active"):
        run(w, p, model=with_ctx)
    windowed = w.Windowed.execute(w.model, p, 0).args[0]
    with pytest.raises(ValueError, match="already carries a ControlSync window plan"):
        run(w, p, model=windowed)


# --- T2I adapters and Control-LoRAs: real ControlBase copies per window too ----------------------

@pytest.mark.parametrize("kind", ["t2i", "control_lora"])
def test_t2i_adapter_and_control_lora(w, kind):
    """The control's own network (the T2I adapter module; the ControlNet that Control-LoRA builds at pre-run)
    receives, for every window, the window's crop of the canvas-sized condition cut here, and nothing else."""
    import comfy.cldm.cldm
    import comfy.utils
    tm = w.tm
    with torch.inference_mode():
        model = tm.tiny_model(0, arch="sd15_deep") if kind == "t2i" else w.model
        control = tm.tiny_t2i_adapter() if kind == "t2i" else tm.tiny_control_lora()
        pos, neg = w.nodes.ControlNetApplyAdvanced().apply_controlnet(tm.text_cond(1), tm.text_cond(2), control,
                                                                      w.image, 1.0, 0.0, 1.0)
    plain = ksampler(w, model=model, pos=tm.text_cond(1), neg=tm.text_cond(2))
    ref = ksampler(w, model=model, pos=pos, neg=neg)
    assert not torch.equal(ref, plain)  # the control really acts on the model
    assert torch.equal(run(w, full_window(w), model=model, pos=pos, neg=neg), ref)
    hints = []
    if kind == "t2i":
        handle = control.t2i_model.register_forward_hook(lambda m, args, out: hints.append(args[0].clone()))
    else:  # the Control-LoRA's ControlNet exists only during sampling: watch every ControlNet module
        handle = torch.nn.modules.module.register_module_forward_hook(
            lambda m, args, kwargs, out: hints.append(kwargs["hint"].clone())
            if isinstance(m, comfy.cldm.cldm.ControlNet) else None, with_kwargs=True)
    try:
        windows = run(w, plan(w), model=model, pos=pos, neg=neg, steps=1)
    finally:
        handle.remove()
    canvas_hint = comfy.utils.common_upscale(w.image.movedim(-1, 1), 192, 64, control.upscale_algorithm, "center")[0]
    expected = [canvas_hint[:, 8 * y:8 * (y + h), 8 * x:8 * (x + ww)] for y, x, h, ww in WINDOW_RECTS]
    items = [h for hint in hints for h in hint]
    assert bool(torch.isfinite(windows).all()) and len(items) >= len(expected)
    for item in items:
        assert any(item.shape == e.shape and torch.equal(item, e.to(item.dtype)) for e in expected)
    for e in expected:
        assert any(item.shape == e.shape and torch.equal(item, e.to(item.dtype)) for item in items)
