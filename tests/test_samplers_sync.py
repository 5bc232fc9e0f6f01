"""AnchorSync with every sampler ComfyUI offers, inside a real ComfyUI (tiny seeded SD1.5 model, ControlNet,
VAE; LPIPS-alex; 64 px windows at stride 32: two over a 64x96 canvas for the every-sampler comparison, three over
64x128 for the rest), on an eps model and on the same model sampling as a flow model (ModelSamplingSD3).

- Every sampler the pack accepts equals the papers' algorithm - per-window moves, per-window denoise,
  MultiDiffusion merge, then the sampler's own step from the moved canvas - written in
  tests/window_reference.py and run through ComfyUI's own sampler function, at 20 and 50 steps.
- Every sampler syncs exactly once per step, at the step's first model evaluation: the gradient passes,
  counted below the pack by an APPLY_MODEL wrapper (calls whose input requires grad), are exactly the
  synced steps times the non-anchor windows, at the sigmas those steps start at.
- Refused at the node with a message: dpm_fast and dpm_adaptive (no fixed step per schedule point), uni_pc,
  uni_pc_bh2 (they evaluate a rescaled copy of their state), sa_solver, sa_solver_pece (their corrector steps
  from the previous corrected state, not from the latent they evaluated).
"""
from __future__ import annotations

import pytest
import torch

from test_sync import build_world, s, sync_settings  # noqa: F401  (s: the shared fixture)
from window_reference import WindowReference

CANVAS_PX = (64, 128)
STARTS = [0, 4, 8]            # three 64 px windows, stride 32 px, in latent cells
LATENT = (1, 4, 8, 16)
SEED, CFG = 3, 7.5
FLOW_SHIFT = 3.0

# ComfyUI 0.33.0's KSampler.SAMPLERS (a newer host's extra samplers fail test_every_offered_sampler_is_covered
# until they are listed here)
REFUSED = {"dpm_fast": "does not take one step per point of the schedule",
           "dpm_adaptive": "does not take one step per point of the schedule",
           "uni_pc": "evaluates a temporary copy of its state", "uni_pc_bh2": "evaluates a temporary copy of its state",
           "sa_solver": "does not step from the tensor it evaluates",
           "sa_solver_pece": "does not step from the tensor it evaluates"}
SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "exp_heun_2_x0",
    "exp_heun_2_x0_sde", "dpm_2", "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm",
    "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde", "seeds_2",
    "seeds_3", "ddim",
]

# AnchorSync's schedule by hand (sampling/sync.py's module doc): a whole schedule of N steps syncs its first
# floor(10 N / 50 + 1/2) steps with w * 0.95^(t * 50 / N): 4 of 20, 10 of 50
WEIGHT = 20.0


def hand_weights(steps):
    synced = int(10 * steps / 50 + 0.5)
    return [WEIGHT * 0.95 ** (t * 50 / steps) if t < synced else 0.0 for t in range(steps)]


# within float32 rounding of the result's largest value (the pack and the reference add up the same numbers in
# another order): at most 4.5e-6 is seen; the sync's moves are 8.8e-4 to 5.4e-3 of it
EXACT = 4e-5


def canvas(s, width_px, starts):
    """A row of 64 px windows at stride 32 over a 64 px high canvas, with its condition image and the eps and flow
    worlds (inference-mode models for the pack, plain ones for the reference)."""
    import tiny_models as tm
    from controlsync.nodes.window_planner import WindowPlanner

    class Canvas:
        pass
    t = Canvas()
    t.starts, t.latent = starts, (1, 4, 8, width_px // 8)
    t.image = tm.condition_image(64, width_px)
    t.plan = WindowPlanner.execute(width_px, 64, 64, 64, 32, "first", 0, "uniform", image=t.image).args[0]
    t.worlds = {}
    for kind in ("eps", "flow"):
        t.worlds[kind] = (world_at(s, t.image, True, kind), world_at(s, t.image, False, kind))
    return t


@pytest.fixture(scope="module")
def small(s):
    return canvas(s, CANVAS_PX[1], STARTS)


@pytest.fixture(scope="module")
def pair(s):
    """Two windows (the anchor and one that moves, half overlapping): the every-sampler sweep's canvas, two thirds
    of the three windows' cost."""
    return canvas(s, 96, [0, 4])


def world_at(s, image, inference, kind="eps", dtype=torch.float32, prompt_scale=1.0):
    """tests/test_sync.py's world with this canvas's condition image; `kind` flow: the model patched with
    ModelSamplingSD3 as users do (the plain world, for the reference, samples with the patched sampling).
    `prompt_scale` scales the text embeddings: the tiny random model barely listens to unit-size ones (cfg 7.5
    and cfg 1 then end 0.01 apart), scaled by 20 the prompts, and so the guiders' formulas, change the result
    measurably (0.3)."""
    saved = s.image
    s.image = image
    try:
        world = build_world(s, dtype, inference)
    finally:
        s.image = saved
    with torch.inference_mode() if inference else torch.no_grad():
        if prompt_scale != 1.0:
            for name in ("pos_text", "neg_text"):
                world[name] = [[world[name][0][0] * prompt_scale, {}]]
            world["pos"], world["neg"] = s.nodes.ControlNetApplyAdvanced().apply_controlnet(
                world["pos_text"], world["neg_text"], world["cn"], image.to(dtype), 1.0, 0.0, 1.0)
        if kind == "flow":
            import comfy_extras.nodes_model_advanced as advanced
            patched = advanced.ModelSamplingSD3().patch(world["model"], FLOW_SHIFT)[0]
            if inference:
                world["model"] = patched
            else:
                world["model"].model.model_sampling = patched.get_model_object("model_sampling")
    world["kind"] = kind
    return world


def run(s, t, world, sampler, sync=None, model=None, scheduler="normal", steps=3, control=True, states=None):
    """The latent from ControlSync Sampler; `states`: a list to collect the sampler's x at every step (as it
    reports it to its progress callback) and the final x."""
    latent = {"samples": torch.zeros(t.latent, dtype=world["dtype"])}
    pos, neg = (world["pos"], world["neg"]) if control else (world["pos_text"], world["neg_text"])
    model = model or world["model"]
    if states is not None:
        model = model.clone()
        model.add_wrapper_with_key(s.pe.WrappersMP.SAMPLER_SAMPLE, "test.states", state_recorder(states))
    with torch.inference_mode():
        out = s.Sampler.execute(model, SEED, steps, CFG, sampler, scheduler, pos, neg, latent, t.plan, 1.0, 1, sync)
    return out.args[0]["samples"]


def state_recorder(states):
    """SAMPLER_SAMPLE wrapper: the sampler's x at each step (what it reports) and its final x."""
    def wrapper(executor, model_wrap, sigmas, extra_args, callback, noise, *args, **kwargs):
        def recording(step, x0, x, total):
            states.append(x.clone())
            if callback is not None:
                callback(step, x0, x, total)
        out = executor(model_wrap, sigmas, extra_args, recording, noise, *args, **kwargs)
        states.append(out.clone())
        return out
    return wrapper


def schedule(world, sampler, steps, scheduler="normal"):
    import comfy.samplers
    return comfy.samplers.KSampler(world["model"], steps, "cpu", sampler, scheduler, 1.0).sigmas


def cfg_guide(pred, sigma, x):
    return pred("negative") + CFG * (pred("positive") - pred("negative"))


def reference(t, world, sampler, steps, weights):
    conds = {"positive": (world["pos_text"][0][0], False), "negative": (world["neg_text"][0][0], False)}
    ref = WindowReference(world, t.image, t.starts, conds, cfg_guide, flow=world["kind"] == "flow", batch_prompts=True)
    ref.sample(sampler, schedule(world, sampler, steps), SEED, weights, t.latent, cfg_scale=CFG)
    return ref


def test_every_offered_sampler_is_covered(s):
    import comfy.samplers
    assert set(comfy.samplers.KSampler.SAMPLERS) <= set(SAMPLERS) | set(REFUSED)


# every sampler at 20 steps on both models; at 50 steps every sampler on one of them (eps and flow alternating down
# SAMPLERS), and one of each kind of step - ancestral, two evaluations, multistep, SDE, LCM - on both (the suite's
# time: a 50-step case takes 5-8 s on these machines)
BOTH_AT_50 = ("euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "lcm")
CASES = [(sampler, 20, kind) for sampler in SAMPLERS for kind in ("eps", "flow")] + [
    (sampler, 50, kind) for i, sampler in enumerate(SAMPLERS)
    for kind in (("eps", "flow") if sampler in BOTH_AT_50 else (("eps", "flow")[i % 2],))]


@pytest.mark.parametrize("sampler,steps,kind", CASES)
def test_sampler_equals_the_papers_algorithm(s, pair, sampler, steps, kind):
    """The sampler's x at every step and at the end, against the reference's: a move missed or misplaced at
    any step shows there at the size of the move."""
    import comfy.samplers
    if sampler not in comfy.samplers.KSampler.SAMPLERS:
        pytest.skip(f"{sampler} is not offered by this ComfyUI")
    inference, plain = pair.worlds[kind]
    ours = []
    run(s, pair, inference, sampler, sync_settings(s, inference, weight=WEIGHT, decay=0.95, steps=10), steps=steps,
        control=False, states=ours)
    ref = reference(pair, plain, sampler, steps, hand_weights(steps))
    assert len(ours) == len(ref.states) == steps + 1
    scale = max(r.abs().max().item() for r in ref.states)
    error = max((a - b).abs().max().item() for a, b in zip(ours, ref.states))
    moves = max(ref.moves)
    print(f"[samplers] {kind} {sampler} {steps} steps: max |pack - reference| over the steps = {error:.1e} "
          f"(relative {error / scale:.1e}); the sync's largest canvas move {moves:.3f} (relative {moves / scale:.1e})")
    assert error < EXACT * scale
    assert moves > 10 * EXACT * scale  # not vacuous: a move the pack missed would show far above the bound


def gradient_pass_counter(record):
    """APPLY_MODEL wrapper: the sigma of every model call that autograd runs through (the sync's gradient
    passes; the sampler's own evaluations run in inference mode)."""
    def wrapper(executor, x, t, *args, **kwargs):
        if torch.is_grad_enabled() and x.requires_grad:
            record.append(float(t.flatten()[0]))
        return executor(x, t, *args, **kwargs)
    return wrapper


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpm_2", "dpmpp_sde", "seeds_3", "lcm", "dpmpp_2m"])
def test_sampler_syncs_once_per_step(s, small, sampler):
    """One gradient pass per non-anchor window per synced step, at the sigma the step starts at, also for
    samplers with several evaluations per step (their later evaluations see the moved state)."""
    inference = small.worlds["eps"][0]
    steps = 10
    sigmas = schedule(inference, sampler, steps).tolist()
    record = []
    counted = inference["model"].clone()
    counted.add_wrapper_with_key(s.pe.WrappersMP.APPLY_MODEL, "test.gradient_passes", gradient_pass_counter(record))
    run(s, small, inference, sampler, sync_settings(s, inference, steps=10), model=counted, steps=steps, control=False)
    synced = sum(w > 0 for w in hand_weights(steps))
    assert record == pytest.approx([sigma for sigma in sigmas[:synced] for _ in STARTS[1:]], rel=1e-5)


@pytest.mark.parametrize("sampler", list(REFUSED))
def test_samplers_the_sync_cannot_follow_are_refused(s, small, sampler):
    import comfy.samplers
    if sampler not in comfy.samplers.KSampler.SAMPLERS:
        pytest.skip(f"{sampler} is not offered by this ComfyUI")
    world = small.worlds["eps"][0]
    with pytest.raises(ValueError, match=rf"sync: the sampler '{sampler.replace('uni_pc', 'unipc')}' .*"
                                         rf"{REFUSED[sampler]}.*disconnect sync"):
        run(s, small, world, sampler, sync_settings(s, world, steps=25))


def custom_run(s, t, world, sigmas, sync, latent=None, noise=True, model=None):
    """ControlSync Windowed Model -> CFGGuider -> SamplerCustomAdvanced (euler) with the given sigmas."""
    import comfy_extras.nodes_custom_sampler as cs
    from controlsync.nodes.windowed_model import ControlSyncWindowedModel
    with torch.inference_mode():
        windowed = ControlSyncWindowedModel.execute(model or world["model"], t.plan, 1, sync).args[0]
        guider = cs.CFGGuider().get_guider(windowed, world["pos_text"], world["neg_text"], CFG)[0]
        source = cs.RandomNoise().get_noise(SEED)[0] if noise else cs.DisableNoise().get_noise()[0]
        latent = latent or {"samples": torch.zeros(t.latent, dtype=world["dtype"])}
        return cs.SamplerCustomAdvanced().sample(source, guider, cs.KSamplerSelect().get_sampler("euler")[0], sigmas,
                                                 latent)[0]


def test_split_sigmas_sync_the_steps_of_the_whole_schedule(s, small):
    """SplitSigmas at step 2 of 20: the high half syncs steps 0 and 1 and the low half steps 2 and 3, with the whole
    schedule's weights, so the two runs end where the whole run ends (euler keeps no state but x); counted in
    their own lengths instead, they would not."""
    import comfy_extras.nodes_custom_sampler as cs
    world = small.worlds["eps"][0]
    sync = sync_settings(s, world, weight=WEIGHT, decay=0.95, steps=10)
    with torch.inference_mode():
        sigmas = cs.BasicScheduler().get_sigmas(world["model"], "normal", 20, 1.0)[0]
        high, low = cs.SplitSigmas().get_sigmas(sigmas, 2)
    whole = custom_run(s, small, world, sigmas, sync)["samples"]
    halves = custom_run(s, small, world, low, sync, latent=custom_run(s, small, world, high, sync), noise=False)["samples"]
    unsynced = custom_run(s, small, world, sigmas, None)["samples"]
    error, moved = (whole - halves).abs().max().item(), (whole - unsynced).abs().max().item()
    print(f"[samplers] split at 2 of 20: max |whole - halves| = {error:.1e}; sync moved the result by {moved:.3f}")
    assert error < EXACT * whole.abs().max().item() and moved > 10 * EXACT * whole.abs().max().item()


def test_the_papers_ddim_timesteps_as_sigmas_sync_their_first_10_steps(s, small):
    """The SyncDiffusion code's 50 DDIM timesteps (981, 961, ..., 1, then t = 0) as custom sigmas: not a ComfyUI
    schedule, but from pure noise: the first 10 of their 50 steps are synced (tests/test_schedules.py has the
    weights), one gradient pass per non-anchor window each."""
    world = small.worlds["eps"][0]
    model_sampling = world["model"].get_model_object("model_sampling")
    sigmas = torch.tensor([float(model_sampling.sigmas[t]) for t in [981 - 20 * i for i in range(50)] + [0]])
    record = []
    counted = world["model"].clone()
    counted.add_wrapper_with_key(s.pe.WrappersMP.APPLY_MODEL, "test.gradient_passes", gradient_pass_counter(record))
    custom_run(s, small, world, sigmas, sync_settings(s, world, steps=10), model=counted)
    assert record == pytest.approx([float(sigma) for sigma in sigmas[:10] for _ in STARTS[1:]], rel=1e-5)
