"""AnchorSync inside a real ComfyUI: the paper's algorithm, a real gradient, and nothing leaking.

The reference below is written from the paper's Algorithm 1, straight on ComfyUI's model objects
(no pack code): per synced step, decode the anchor's x0-prediction, move every other window by
w_t (1 + sigma^2) grad LPIPS, denoise each window from its moved latent, take each window's Euler/DDIM
step and average the windows.
"""
from __future__ import annotations

import logging
import re

import pytest
import torch

from lpips_weights import reference_lpips

CANVAS_PX = (64, 192)
WINDOW_STARTS = [0, 4, 8, 12, 16]  # 64 px windows, stride 32 px, in latent cells


@pytest.fixture(scope="module")
def s(comfy):
    import comfy.patcher_extension
    import nodes
    import lpips_weights
    import tiny_models as tm
    from controlsync.nodes import bridge
    from controlsync.nodes.anchor_sync import AnchorSync
    from controlsync.nodes.controlsync_sampler import ControlSyncSampler
    from controlsync.nodes.window_planner import WindowPlanner

    lpips_weights.use_cached_backbones()

    class S:
        pass
    s = S()
    s.nodes, s.tm, s.pe, s.bridge = nodes, tm, comfy.patcher_extension, bridge
    s.Planner, s.Sampler, s.Sync = WindowPlanner, ControlSyncSampler, AnchorSync
    s.image = tm.condition_image(*CANVAS_PX)
    s.plan = WindowPlanner.execute(192, 64, 64, 64, 32, "first", 0, "uniform", image=s.image).args[0]
    s.inference = build_world(s, torch.float32, inference=True)
    return s


def build_world(s, dtype, inference):
    """Models, conds and VAE; under inference mode as ComfyUI's executor builds them, or as plain tensors
    for the reference loop (same seeds, same weights)."""
    tm = s.tm
    ctx = torch.inference_mode() if inference else torch.no_grad()
    with ctx:
        unet = dict(tm.SD15_UNET)
        model = tm.tiny_model(0)
        cn = tm.tiny_controlnet(1)
        vae = tm.tiny_vae()
        if dtype == torch.float64:
            model.model.to(dtype)
            model.model.diffusion_model.dtype = dtype
            model.model.manual_cast_dtype = None
            model.model.model_config.unet_config["dtype"] = dtype
            tm.sample_in_model_dtype(model, dtype)  # ComfyUI 0.33's sampler runs in float32 otherwise
            cn.control_model.to(dtype)
            cn.control_model.dtype = dtype
            vae.first_stage_model.to(dtype)
            vae.vae_dtype = dtype
        pos_text, neg_text = tm.text_cond(10), tm.text_cond(11)
        pos_text = [[pos_text[0][0].to(dtype), {}]]
        neg_text = [[neg_text[0][0].to(dtype), {}]]
        pos, neg = s.nodes.ControlNetApplyAdvanced().apply_controlnet(pos_text, neg_text, cn, s.image.to(dtype), 1.0, 0.0, 1.0)
    assert tm.SD15_UNET == unet
    return dict(model=model, cn=cn, vae=vae, pos=pos, neg=neg, pos_text=pos_text, neg_text=neg_text, dtype=dtype)


def sync_settings(s, world, weight=20.0, decay=0.95, steps=50, net="alex", gradient="exact"):
    with torch.inference_mode():
        return s.Sync.execute(world["vae"], weight, decay, steps, net, gradient).args[0]


def run(s, world, sync=None, sampler="euler", scheduler="normal", steps=4, cfg=7.5, seed=3, model=None, plan=None,
        pos=None, neg=None, batch=0):
    latent = {"samples": torch.zeros(1, 4, 8, 24, dtype=world["dtype"])}
    with torch.inference_mode():
        out = s.Sampler.execute(model or world["model"], seed, steps, cfg, sampler, scheduler, pos or world["pos"],
                                neg or world["neg"], latent, plan or s.plan, 1.0, batch, sync)
    return out.args[0]["samples"]


# --- the paper's algorithm, written out -----------------------------------------------------------

class Reference:
    def __init__(self, s, world, cfg=7.5, net="alex"):
        self.s, self.w, self.cfg = s, world, cfg
        self.model = world["model"].model
        self.hint = s.image.movedim(-1, 1).to(world["dtype"])
        self.patches = {"patches": {"input_block_patch_after_skip": [lambda h, o: h.clone()]}}
        self.lpips = reference_lpips(net, world["dtype"])

    def denoise(self, x, sigma, window):
        """CFG'd x0-prediction of one window, its ControlNet fed the window's crop of the hint."""
        x0 = WINDOW_STARTS[window]
        control = self.w["cn"].copy()
        control.set_cond_hint(self.hint[..., x0 * 8:(x0 + 8) * 8], 1.0, (0.0, 1.0))
        control.model_sampling_current = self.model.model_sampling
        t = sigma.reshape(1).to(x.dtype).expand(x.shape[0])

        # one call for uncond and cond, batched in the order ComfyUI batches them
        xx, tt = torch.cat([x, x]), torch.cat([t, t])
        ctx = torch.cat([self.w["neg_text"][0][0], self.w["pos_text"][0][0]])
        ctrl = control.get_control(xx, tt, {"c_crossattn": ctx}, 2, self.patches)
        uncond, cond = self.model.apply_model(xx, tt, c_crossattn=ctx, control=ctrl, transformer_options=self.patches).chunk(2)
        return uncond + (cond - uncond) * self.cfg

    def image(self, x0):
        z = self.model.latent_format.process_out(x0)
        return self.w["vae"].first_stage_model.decode(z).clamp(-1, 1)

    def loss(self, x, sigma, window, anchor_image):
        return self.lpips(self.image(self.denoise(x, sigma, window)), anchor_image, normalize=False).sum()

    def sample(self, seed, steps, scheduler, schedule):
        import comfy.sample
        import comfy.samplers
        sigmas = comfy.samplers.calculate_sigmas(self.model.model_sampling, scheduler, steps).to(self.w["dtype"])
        latent = torch.zeros(1, 4, 8, 24, dtype=self.w["dtype"])
        noise = comfy.sample.prepare_noise(latent, seed)
        max_sigma = float(self.model.model_sampling.sigma_max)
        max_denoise = abs(float(sigmas[0]) - max_sigma) <= 1e-5 * max_sigma or float(sigmas[0]) > max_sigma
        x = self.model.model_sampling.noise_scaling(sigmas[0], noise, latent, max_denoise=max_denoise)
        for i in range(steps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            windows = [x[..., s:s + 8].clone() for s in WINDOW_STARTS]
            w_t = schedule.weight_at(i, steps)
            moved = list(windows)
            if w_t > 0:
                with torch.no_grad():
                    anchor_image = self.image(self.denoise(windows[0], sigma, 0))
                for k in range(1, len(windows)):
                    xk = windows[k].detach().requires_grad_(True)
                    with torch.enable_grad():
                        (g,) = torch.autograd.grad(self.loss(xk, sigma, k, anchor_image), xk)
                    moved[k] = windows[k] - w_t * (1 + float(sigma) ** 2) * g
            total = torch.zeros_like(x)
            count = torch.zeros_like(x)
            for k, xk in enumerate(moved):
                with torch.no_grad():
                    d = self.denoise(xk, sigma, k)
                stepped = xk + (sigma_next - sigma) * (xk - d) / sigma  # Euler in VE space = DDIM, eta 0
                start = WINDOW_STARTS[k]
                total[..., start:start + 8] += stepped
                count[..., start:start + 8] += 1
            x = total / count
        return self.model.process_latent_out(x)


@pytest.fixture(scope="module")
def world64(s):
    return build_world(s, torch.float64, inference=True)


@pytest.mark.parametrize("sampler,scheduler", [("euler", "normal")])
def test_synced_run_equals_the_papers_algorithm(s, world64, sampler, scheduler):
    """Exact in float64 (the tiny random models' latents reach ~300, so float32 rounding alone is ~1e-4
    absolute there: checked relative below). ddim, heun, CFG++ and every guider: tests/test_samplers_sync.py,
    tests/test_guiders.py."""
    schedule = s.bridge.SyncSchedule(20.0, 0.95, 50)
    for world, plain, tolerance in ((world64, build_world(s, torch.float64, inference=False), None),
                                    (s.inference, build_world(s, torch.float32, inference=False), 2e-6)):
        ref = Reference(s, plain).sample(3, 4, scheduler, schedule)
        ours = run(s, world, sync_settings(s, world), sampler=sampler, scheduler=scheduler, batch=1)
        unsynced = run(s, world, sampler=sampler, scheduler=scheduler, batch=1)
        error = (ours - ref).abs().max().item()
        moved = (ours - unsynced).abs().max().item()
        print(f"[sync] {sampler}/{scheduler} {world['dtype']}: max |pack - reference| = {error:.2e} "
              f"(relative {error / ref.abs().max().item():.1e}); sync moved the result by {moved:.3f}")
        assert moved > 100 * error  # the comparison is not vacuous
        if tolerance is None:
            assert error < 1e-4
        else:
            assert error < tolerance * ref.abs().max().item()


class Recorder:
    """Below our wrapper: the latents each window is evaluated at (gradient passes and the denoising pass)."""

    def __init__(self):
        self.calls = []

    def __call__(self, executor, model, conds, x, timestep, *args, **kwargs):
        self.calls.append((x.detach().clone(), x.requires_grad, float(timestep[0])))
        return executor(model, conds, x, timestep, *args, **kwargs)


def recorded_run(s, world, sync, steps=1, **kw):
    recorder = Recorder()
    windowed = s.bridge.windowed_model(world["model"], s.plan, 1, sync)
    windowed.add_wrapper_with_key(s.pe.WrappersMP.CALC_COND_BATCH, "test.recorder", recorder)
    model = world["model"]
    # run the already-windowed clone through the sampler node's path (common_ksampler) directly
    latent = {"samples": torch.zeros(1, 4, 8, 24, dtype=world["dtype"])}
    with torch.inference_mode():
        out = s.nodes.common_ksampler(windowed, kw.get("seed", 3), steps, 7.5, "euler", "normal",
                                      kw.get("pos", world["pos"]), kw.get("neg", world["neg"]), latent)[0]["samples"]
    assert model.get_wrappers(s.pe.WrappersMP.CALC_COND_BATCH, "test.recorder") == []
    return recorder.calls, out


def first_step_latents(calls):
    """(unmoved, moved) latents of every window in the first synced step, read below the wrapper: the
    anchor's evaluation comes first, then one gradient pass per other window at its unmoved latent, then
    the denoising pass at the moved latents - without the anchor, whose output is reused."""
    grad_done = [i for i, c in enumerate(calls) if c[1]]
    assert not calls[0][1] and grad_done == list(range(1, len(WINDOW_STARTS)))
    unmoved = [calls[0][0]] + [calls[i][0] for i in grad_done]
    denoise = calls[grad_done[-1] + 1: grad_done[-1] + len(WINDOW_STARTS)]
    assert all(not c[1] for c in denoise) and len(denoise) == len(WINDOW_STARTS) - 1
    return unmoved, [calls[0][0]] + [c[0] for c in denoise]


def test_gradient_matches_finite_differences_in_float64(s, world64):
    """The pack's window update, read below its wrapper, against central differences of the loss
    written out in the test (float64 models, LPIPS and VAE)."""
    weight = 0.5
    calls, _ = recorded_run(s, world64, sync_settings(s, world64, weight=weight, decay=1.0))
    canvas_windows, moved = first_step_latents(calls)
    sigma = torch.tensor(calls[0][2], dtype=torch.float64)
    plain64 = build_world(s, torch.float64, inference=False)
    ref = Reference(s, plain64)
    with torch.no_grad():
        anchor_image = ref.image(ref.denoise(canvas_windows[0], sigma, 0))
    window = 2
    x = canvas_windows[window]
    grad_pack = (x - moved[window]) / (weight * (1 + float(sigma) ** 2))
    assert grad_pack.abs().max() > 0
    g = torch.Generator().manual_seed(0)
    eps = 1e-3  # float64 end to end except a few float32 constants in ComfyUI's model code: 1e-3 keeps
    # their rounding (~1e-11 in the loss) far below the truncation error
    for _ in range(3):
        v = torch.randn(x.shape, generator=g, dtype=torch.float64)
        with torch.no_grad():
            fd = (ref.loss(x + eps * v, sigma, window, anchor_image) - ref.loss(x - eps * v, sigma, window, anchor_image)) / (2 * eps)
        analytic = (grad_pack * v).sum()
        rel = abs(float(fd) - float(analytic)) / max(abs(float(fd)), 1e-12)
        print(f"[sync] finite difference {float(fd):.6e} vs pack {float(analytic):.6e}: relative error {rel:.1e}")
        assert rel < 1e-3


def test_anchor_is_not_moved_and_hint_reaches_the_gradient(s):
    world = s.inference
    calls, _ = recorded_run(s, world, sync_settings(s, world))
    unmoved, moved = first_step_latents(calls)
    assert torch.equal(moved[0], unmoved[0])  # the anchor's own update is zero
    assert all(not torch.equal(m, u) for m, u in zip(moved[1:], unmoved[1:]))
    # another condition image (only the hint differs): other gradients
    with torch.inference_mode():
        pos, neg = s.nodes.ControlNetApplyAdvanced().apply_controlnet(world["pos_text"], world["neg_text"], world["cn"],
                                                                      s.image.flip(2), 1.0, 0.0, 1.0)
    calls2, _ = recorded_run(s, world, sync_settings(s, world), pos=pos, neg=neg)
    unmoved2, moved2 = first_step_latents(calls2)
    assert torch.equal(unmoved2[2], unmoved[2])
    assert not torch.equal(moved[2] - unmoved[2], moved2[2] - unmoved2[2])


def test_weight_zero_is_exactly_unsynced_and_sync_changes_the_result(s):
    world = s.inference
    unsynced = run(s, world)
    assert torch.equal(run(s, world, sync_settings(s, world, weight=0.0)), unsynced)
    assert torch.equal(run(s, world, sync_settings(s, world, steps=0)), unsynced)
    assert not torch.equal(run(s, world, sync_settings(s, world)), unsynced)


def window_lpips_to_anchor(s, world, latent, net="alex"):
    loss = s.bridge.load_lpips(net, "cpu")
    with torch.inference_mode():
        images = world["vae"].decode(latent).movedim(-1, 1) * 2 - 1
    crops = [images[..., x * 8:(x + 8) * 8] for x in WINDOW_STARTS]
    return [float(loss(c, crops[0])) for c in crops[1:]]


def test_sync_lowers_each_windows_distance_to_the_anchor(s):
    world = s.inference
    unsynced = run(s, world, steps=6)
    synced = run(s, world, sync_settings(s, world, weight=200.0, decay=1.0), steps=6)
    before, after = window_lpips_to_anchor(s, world, unsynced), window_lpips_to_anchor(s, world, synced)
    print(f"[sync] LPIPS to anchor per window without sync {[round(v, 4) for v in before]}, "
          f"with sync {[round(v, 4) for v in after]}")
    assert sum(after) < sum(before)
    assert sum(a < b for a, b in zip(after, before)) >= 3


def test_fast_modes_run_and_differ_from_exact(s):
    world = s.inference
    exact = run(s, world, sync_settings(s, world))
    fast = run(s, world, sync_settings(s, world, gradient="skip model Jacobian"))
    assert bool(torch.isfinite(fast).all()) and not torch.equal(fast, exact)
    with torch.inference_mode():
        half_settings = s.Sync.execute(world["vae"], 20.0, 0.95, 50, "alex", "exact", "half").args[0]
    half = run(s, world, half_settings)
    assert half_settings.loss_downscale == 2
    assert bool(torch.isfinite(half).all()) and not torch.equal(half, exact) and not torch.equal(half, run(s, world))


# --- nothing leaks -------------------------------------------------------------------------------

def _state(world):
    model = world["model"]
    return {
        "options": repr(model.model_options), "wrappers": repr(model.wrappers),
        "params": [(id(p), p.is_inference()) for p in model.model.parameters()]
                  + [(id(p), p.is_inference()) for p in world["cn"].control_model.parameters()]
                  + [(id(p), p.is_inference()) for p in world["vae"].first_stage_model.parameters()],
        "values": [p.clone() for p in model.model.parameters()],
    }


def _same(a, b):
    assert a["options"] == b["options"] and a["wrappers"] == b["wrappers"] and a["params"] == b["params"]
    assert all(torch.equal(x, y) for x, y in zip(a["values"], b["values"]))


def _grad_pass_hook(action):
    def wrapper(executor, *args, **kwargs):
        if torch.is_grad_enabled():
            action()
        return executor(*args, **kwargs)
    return wrapper


def test_nothing_leaks_after_success_error_in_gradient_pass_and_cancel(s):
    import comfy.model_management as mm
    world = s.inference
    sync = sync_settings(s, world)
    reference = run(s, world)
    before = _state(world)
    with torch.inference_mode():
        run(s, world, sync)
        assert torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
    _same(before, _state(world))

    def boom():
        raise RuntimeError("boom in the gradient pass")
    base = world["model"].clone()
    base.add_wrapper_with_key(s.pe.WrappersMP.APPLY_MODEL, "test.boom", _grad_pass_hook(boom))
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="boom in the gradient pass"):
            run(s, world, sync, model=base)
        assert torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
    _same(before, _state(world))

    base = world["model"].clone()
    base.add_wrapper_with_key(s.pe.WrappersMP.APPLY_MODEL, "test.cancel",
                              _grad_pass_hook(lambda: mm.interrupt_current_processing(True)))
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(s, world, sync, model=base)
    finally:
        mm.interrupt_current_processing(False)
    _same(before, _state(world))
    assert torch.equal(run(s, world), reference)


# --- bad input -----------------------------------------------------------------------------------

def assert_download_hint(message: str, net: str) -> None:
    """The missing-backbone message gives torchvision's own address and size of the file (its weights metadata)."""
    import torchvision.models
    weights = {"alex": torchvision.models.AlexNet_Weights, "vgg": torchvision.models.VGG16_Weights}[net].IMAGENET1K_V1
    assert weights.url in message and f"{round(weights.meta['_file_size'])} MB" in message, message


def test_bad_inputs(s, caplog, monkeypatch, tmp_path):
    import folder_paths
    world = s.inference
    with pytest.raises(ValueError, match="vae: AnchorSync needs a VAE"):
        s.Sync.execute(None, 20.0, 0.95, 10, "vgg", "exact")

    one = s.Planner.execute(192, 64, 192, 64, 64, "first", 0, "uniform").args[0]
    with caplog.at_level(logging.WARNING):
        out = run(s, world, sync_settings(s, world), plan=one)
    assert "one window, so AnchorSync has nothing to synchronise" in caplog.text
    assert torch.equal(out, run(s, world, plan=one))

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "lpips", ([str(tmp_path / "none")], set()))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="lpips_net: LPIPS-alex needs .*'alexnet-owt-7be5be79.pth'.*models/lpips") as err:
        s.Sync.execute(world["vae"], 20.0, 0.95, 10, "alex", "exact")
    assert_download_hint(str(err.value), "alex")
    monkeypatch.undo()

    def nan_first_window():
        nan_first_window.calls += 1
        if nan_first_window.calls == 1:
            raise FloatingPointError  # replaced below by a NaN output
    calls = {"n": 0}

    def poison(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 1:
                return out * float("nan")
        return out
    base = world["model"].clone()
    base.add_wrapper_with_key(s.pe.WrappersMP.APPLY_MODEL, "test.nan", poison)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        out = run(s, world, sync_settings(s, world), model=base, steps=2)
    assert "non-finite sync loss or gradient" in caplog.text and "[1]" in caplog.text
    assert bool(torch.isfinite(out).all())


def test_coherence_report_sees_sync_lower_intra_lpips_and_drift(s):
    """The pack's own metrics and CoherenceReport node on decoded tiny-model results at a fixed seed."""
    from controlsync.nodes.coherence_report import CoherenceReport
    world = s.inference
    results = {}
    for name, sync in (("no sync", None), ("sync", sync_settings(s, world, weight=200.0, decay=1.0))):
        with torch.inference_mode():
            image = world["vae"].decode(run(s, world, sync, steps=6))
            chart, report = CoherenceReport.execute(image, 64, "alex", s.plan).args
        found = re.search(r"intra-LPIPS ([0-9.]+) \| drift mean ([0-9.]+)", report)
        results[name] = (float(found[1]), float(found[2]))
        assert chart.shape[0] == 1 and chart.shape[-1] == 3 and report.startswith("image 0:"), report
    print(f"[sync] tiny models, seed 3: intra-LPIPS / mean drift without sync {results['no sync'][0]:.4f} / "
          f"{results['no sync'][1]:.4f}, with sync {results['sync'][0]:.4f} / {results['sync'][1]:.4f}")
    assert results["sync"][0] < results["no sync"][0] and results["sync"][1] < results["no sync"][1]


def test_coherence_report_bad_inputs(s, monkeypatch, tmp_path):
    import folder_paths
    from controlsync.nodes.coherence_report import CoherenceReport
    with pytest.raises(ValueError, match="crop: the image is 192x64 px, smaller than one crop of 512 px"):
        CoherenceReport.execute(torch.rand(1, 64, 192, 3), 512, "alex")
    with pytest.raises(ValueError, match="image: expected RGB images"):
        CoherenceReport.execute(torch.rand(1, 64, 192, 4), 64, "alex")
    chart, report = CoherenceReport.execute(torch.rand(2, 64, 192, 3), 64, "alex", None, torch.rand(1, 64, 192, 3)).args
    assert chart.shape[0] == 2 and report.count("\n") == 1 and "edge F1" in report
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "lpips", ([str(tmp_path / "none")], set()))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ValueError, match="lpips_net: .*'alexnet-owt-7be5be79.pth'.*models/lpips") as err:
        CoherenceReport.execute(torch.rand(1, 64, 192, 3), 64, "alex")
    assert_download_hint(str(err.value), "alex")


def test_taesd_loss_decoder(s, tmp_path):
    """The fast mode through ComfyUI's TAESD decoder (a seeded random one here, saved where ComfyUI's
    TAESD previews look for it); refused clearly while the file is missing."""
    import comfy.taesd.taesd
    import comfy.utils
    import folder_paths
    world = s.inference
    with torch.inference_mode():
        taesd_sync = s.Sync.execute(world["vae"], 20.0, 0.95, 50, "alex", "exact", "full", "taesd").args[0]
    if not any(f.startswith("taesd_decoder") for f in folder_paths.get_filename_list("vae_approx")):
        with pytest.raises(ValueError, match="loss_decoder 'taesd' needs TAESD's decoder .*vae_approx.*taesd_decoder"):
            run(s, world, taesd_sync)
    decoder = comfy.taesd.taesd.Decoder(4)
    s.tm._init_weights(decoder, 9)
    folder = tmp_path / "vae_approx"
    folder.mkdir()
    comfy.utils.save_torch_file(decoder.state_dict(), str(folder / "taesd_decoder.safetensors"))
    folder_paths.add_model_folder_path("vae_approx", str(folder))
    out = run(s, world, taesd_sync)
    assert bool(torch.isfinite(out).all())
    assert not torch.equal(out, run(s, world)) and not torch.equal(out, run(s, world, sync_settings(s, world)))
