"""AnchorSync where other code meets it, each through the real ComfyUI nodes (tiny SD1.5 world of
tests/test_samplers_sync.py): sampler classes of other packs, two perturbed guidances in one evaluation,
stateful guidance, running out of memory in a gradient batch, torch.compile."""
from __future__ import annotations

import pytest
import torch

from test_samplers_sync import CFG, LATENT, SEED, STARTS, run, small  # noqa: F401  (small: a fixture)
from test_sync import s, sync_settings  # noqa: F401  (s: the shared fixture)


def custom(s, small, world, sampler, sync, model=None, steps=4):
    """ControlSync Windowed Model -> CFGGuider -> SamplerCustomAdvanced with `sampler` (a SAMPLER object)."""
    import comfy_extras.nodes_custom_sampler as cs
    from controlsync.nodes.windowed_model import ControlSyncWindowedModel
    with torch.inference_mode():
        windowed = ControlSyncWindowedModel.execute(model or world["model"], small.plan, 1, sync).args[0]
        guider = cs.CFGGuider().get_guider(windowed, world["pos_text"], world["neg_text"], CFG)[0]
        sigmas = cs.BasicScheduler().get_sigmas(windowed, "normal", steps, 1.0)[0]
        latent = {"samples": torch.zeros(LATENT, dtype=world["dtype"])}
        return cs.SamplerCustomAdvanced().sample(cs.RandomNoise().get_noise(SEED)[0], guider, sampler, sigmas,
                                                 latent)[0]["samples"]


# --- other packs' sampler classes ------------------------------------------------------------------

def test_ksampler_subclasses_keep_their_own_sample(s, small):
    """A KSAMPLER subclass (LanPaint, restart samplers) runs its own sample(), which calls its sampler function with
    positional arguments; windowed, synced or not, the pack counts its evaluations through that function."""
    import comfy.samplers

    class Own(comfy.samplers.KSAMPLER):
        runs = 0

        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            Own.runs += 1
            model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
            model_k.latent_image, model_k.noise = latent_image, noise
            extra_args["denoise_mask"] = denoise_mask
            x = model_wrap.inner_model.model_sampling.noise_scaling(sigmas[0], noise, latent_image, True)
            k_callback = None if callback is None else (lambda d: callback(d["i"], d["denoised"], d["x"], len(sigmas) - 1))
            return self.sampler_function(model_k, x, sigmas, extra_args, k_callback, disable_pbar)  # positional

    world = small.worlds["eps"][0]
    euler = comfy.samplers.ksampler("euler").sampler_function
    plain = custom(s, small, world, comfy.samplers.ksampler("euler"), sync_settings(s, world, steps=25))
    own = custom(s, small, world, Own(euler), sync_settings(s, world, steps=25))
    unsynced = custom(s, small, world, Own(euler), None)
    assert Own.runs == 2
    assert (own - plain).abs().max().item() < 1e-5 * plain.abs().max().item()
    assert (own - unsynced).abs().max().item() > 1e-2


def test_a_sampler_with_its_own_loop_is_refused_with_sync(s, small):
    """A sampler whose sample() never calls its sampler function: the pack cannot see its steps or move its
    latent, so with sync it says so; without sync it runs."""
    import comfy.k_diffusion.sampling as k
    import comfy.samplers

    class OwnLoop(comfy.samplers.KSAMPLER):
        def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                   disable_pbar=False):
            model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
            model_k.latent_image, model_k.noise = latent_image, noise
            extra_args["denoise_mask"] = denoise_mask
            x = model_wrap.inner_model.model_sampling.noise_scaling(sigmas[0], noise, latent_image, True)
            return k.sample_euler(model_k, x, sigmas, extra_args=extra_args, disable=True)

    world = small.worlds["eps"][0]
    assert bool(torch.isfinite(custom(s, small, world, OwnLoop(None), None)).all())
    with pytest.raises(ValueError, match=r"sync: this sampler runs its own loop .*disconnect sync"):
        custom(s, small, world, OwnLoop(None), sync_settings(s, world, steps=25))


# --- two perturbed guidances in one evaluation -----------------------------------------------------------

def perturbed_guidance(model, block, scale):
    """A guidance patch as packs write them (PAG's recipe on any attention block): after CFG, the model is called
    again with that block's self-attention replaced by the identity, through ComfyUI's public API."""
    import comfy.model_patcher
    import comfy.samplers
    m = model.clone()

    def identity(q, k, v, extra_options, mask=None):
        return v

    def post_cfg(args):
        options = comfy.model_patcher.set_model_options_patch_replace(args["model_options"].copy(), identity, "attn1",
                                                                       *block)
        (perturbed,) = comfy.samplers.calc_cond_batch(args["model"], [args["cond"]], args["input"], args["sigma"], options)
        return args["denoised"] + (args["cond_denoised"] - perturbed) * scale
    m.set_model_sampler_post_cfg_function(post_cfg)
    return m


@pytest.mark.parametrize("synced", [False, True])
def test_two_perturbed_guidances_each_get_their_own_pass(s, small, synced):
    """Two such guidances on different blocks: every window of every evaluation gets one call perturbed at each
    block (an APPLY_MODEL hook reads the replaced blocks); none is answered with the other's outputs."""
    world = small.worlds["eps"][0]
    calls = []

    def record(executor, x, t, *args, **kwargs):
        options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        calls.append(tuple(sorted(options.get("patches_replace", {}).get("attn1", {}))))
        return executor(x, t, *args, **kwargs)
    model = perturbed_guidance(perturbed_guidance(world["model"], ("middle", 0), 2.0), ("input", 1), 2.0)
    model.add_wrapper_with_key(s.pe.WrappersMP.APPLY_MODEL, "test.blocks", record)
    steps = 3
    run(s, small, world, "euler", sync_settings(s, world, steps=25) if synced else None, model=model, steps=steps,
        control=False)
    middle, inner = calls.count((("middle", 0),)), calls.count((("input", 1),))
    assert middle == inner >= len(STARTS) * steps


# --- stateful guidance -----------------------------------------------------------------------------------

def test_apg_with_momentum_is_refused_with_sync(s, small):
    import comfy_extras.nodes_apg as apg
    world = small.worlds["eps"][0]
    with torch.inference_mode():
        with_momentum = apg.APG.execute(world["model"], 1.0, 0.0, 0.5).args[0]
        without = apg.APG.execute(world["model"], 1.0, 0.0, 0.0).args[0]
    with pytest.raises(ValueError, match=r"sync: Adaptive Projected Guidance with momentum 0.5 .*Set APG's momentum "
                                         r"to 0, or disconnect sync"):
        run(s, small, world, "euler", sync_settings(s, world, steps=25), model=with_momentum, control=False)
    assert bool(torch.isfinite(run(s, small, world, "euler", None, model=with_momentum, control=False)).all())
    assert bool(torch.isfinite(run(s, small, world, "euler", sync_settings(s, world, steps=25), model=without,
                                   control=False)).all())


# --- out of memory in a gradient batch -------------------------------------------------------------------

def out_of_memory_above(windows, seen):
    """APPLY_MODEL wrapper: ComfyUI's out-of-memory error for a gradient pass of more than `windows` windows (2
    rows each: cond and uncond), as a GPU would raise it; `seen` collects the gradient batches that ran."""
    import comfy.model_management

    def wrapper(executor, x, t, *args, **kwargs):
        if x.requires_grad:
            if x.shape[0] > 2 * windows:
                raise comfy.model_management.OOM_EXCEPTION("CUDA out of memory (injected by the test)")
            seen.append(x.shape[0] // 2)
        return executor(x, t, *args, **kwargs)
    return wrapper


def sampler_node_run(s, small, world, model, sync, batch):
    latent = {"samples": torch.zeros(LATENT, dtype=world["dtype"])}
    with torch.inference_mode():
        return s.Sampler.execute(model, SEED, 3, CFG, "euler", "normal", world["pos_text"], world["neg_text"], latent,
                                 small.plan, 1.0, batch, sync).args[0]["samples"]


def test_out_of_memory_in_a_gradient_batch_halves_it(s, small):
    world = small.worlds["eps"][0]
    sync = sync_settings(s, world, weight=200.0, steps=25)
    seen = []
    model = world["model"].clone()
    model.add_wrapper_with_key(s.pe.WrappersMP.APPLY_MODEL, "test.oom", out_of_memory_above(1, seen))
    halved = sampler_node_run(s, small, world, model, sync, batch=2)
    one = sampler_node_run(s, small, world, world["model"], sync, batch=1)
    assert seen and max(seen) == 1  # the batch of 2 ran out of memory and went on one window at a time
    assert (halved - one).abs().max().item() < 1e-5 * one.abs().max().item()


def test_out_of_memory_with_one_window_says_what_helps(s, small):
    world = small.worlds["eps"][0]
    model = world["model"].clone()
    model.add_wrapper_with_key(s.pe.WrappersMP.APPLY_MODEL, "test.oom", out_of_memory_above(0, []))
    with pytest.raises(ValueError, match=r"sync: out of memory with one window per graph\. Set Anchor Sync's "
                                         r"loss_resolution to half, .*'skip model Jacobian', or plan smaller windows"):
        sampler_node_run(s, small, world, model, sync_settings(s, world, steps=25), batch=1)


# --- torch.compile ----------------------------------------------------------------------------------------

def test_gradient_passes_leave_torch_compile_out(s, small):
    """ComfyUI's torch.compile wrapper (TorchCompileModel's) compiles the model for the sampler's inference calls;
    the gradient passes run the model uncompiled (a graph compiled for inference would recompile, then fall back
    to eager for the whole run). A recording backend sees which inputs each compiled graph was traced with."""
    from comfy_api.torch_helpers.torch_compile import set_torch_compile_wrapper
    torch._dynamo.reset()
    traced = []

    def backend(graph_module, example_inputs):
        traced.append(any(getattr(t, "requires_grad", False) for t in example_inputs))
        return graph_module.forward
    world = small.worlds["eps"][0]
    model = world["model"].clone()
    set_torch_compile_wrapper(model, backend=backend)
    out = run(s, small, world, "euler", sync_settings(s, world, steps=25), model=model, control=False)
    torch._dynamo.reset()
    assert bool(torch.isfinite(out).all())
    assert traced and not any(traced)  # compiled for inference, never for a gradient pass
