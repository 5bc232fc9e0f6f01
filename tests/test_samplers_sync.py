"""AnchorSync with every sampler ComfyUI offers, inside a real ComfyUI (tiny seeded SD1.5 model, ControlNet,
VAE; LPIPS-alex; a 64x128 canvas of three 64 px windows, stride 32).

- Every sampler syncs exactly once per step, at the step's first model evaluation: the gradient passes,
  counted below the pack by an APPLY_MODEL wrapper (calls whose input requires grad), are exactly the
  hand-counted synced steps times the non-anchor windows, at the sigmas those steps start at. The result
  is finite and every window ends nearer the anchor (LPIPS) than without sync.
- dpm_fast and dpm_adaptive (no fixed step per schedule point) are refused at the node with a message.
- euler, ddim, euler_cfg_pp and heun equal the papers' algorithm (tests/window_reference.py; Heun's second
  evaluation continues the step's moves: nodes/bridge.py, _SyncMoves); euler_ancestral and lcm are
  approximations, measured against the same per-window reference.
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

# ComfyUI 0.33.0's KSampler.SAMPLERS (older hosts offer a subset - 0.3.64 lacks the two exp_heun_2_x0 ones -;
# a newer host's extra samplers fail test_every_offered_sampler_is_covered until they are added here)
SAMPLERS = [
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp", "dpmpp_sde", "dpmpp_sde_gpu",
    "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "ipndm", "ipndm_v", "deis", "res_multistep",
    "res_multistep_cfg_pp", "res_multistep_ancestral", "res_multistep_ancestral_cfg_pp", "gradient_estimation",
    "gradient_estimation_cfg_pp", "er_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc",
    "uni_pc_bh2", "exp_heun_2_x0", "exp_heun_2_x0_sde",
]
REFUSED = ["dpm_fast", "dpm_adaptive"]

# The module doc of sampling/sync.py, by hand: a whole schedule of N steps syncs its first
# floor(sync_steps * N / 50 + 1/2) steps. 25 of 50 at 3 steps: floor(1.5 + 0.5) = 2 synced, the last not;
# two synced steps in a row catch a second evaluation landing on the next step's sigma (Heun's).
STEPS, SYNC_STEPS, SYNCED = 3, 25, 2


@pytest.fixture(scope="module")
def small(s):
    import tiny_models as tm
    from controlsync.nodes.window_planner import WindowPlanner

    class Small:
        pass
    t = Small()
    t.image = tm.condition_image(*CANVAS_PX)
    t.plan = WindowPlanner.execute(CANVAS_PX[1], CANVAS_PX[0], 64, 64, 32, "first", 0, "uniform", image=t.image).args[0]
    t.world = world_at(s, t.image, torch.float32, True)
    return t


def world_at(s, image, dtype, inference, prompt_scale=1.0):
    """tests/test_sync.py's world with this canvas's condition image. `prompt_scale` scales the text
    embeddings: the tiny random model barely listens to unit-size ones (cfg 7.5 and cfg 1 then end 0.01
    apart), scaled by 20 the prompts, and so the guiders' formulas, change the result measurably (0.3)."""
    saved = s.image
    s.image = image
    try:
        world = build_world(s, dtype, inference)
    finally:
        s.image = saved
    if prompt_scale != 1.0:
        with torch.inference_mode() if inference else torch.no_grad():
            for name in ("pos_text", "neg_text"):
                world[name] = [[world[name][0][0] * prompt_scale, {}]]
            world["pos"], world["neg"] = s.nodes.ControlNetApplyAdvanced().apply_controlnet(
                world["pos_text"], world["neg_text"], world["cn"], image.to(dtype), 1.0, 0.0, 1.0)
    return world


def run(s, t, world, sampler, sync=None, model=None, scheduler="normal", steps=STEPS, control=True):
    latent = {"samples": torch.zeros(LATENT, dtype=world["dtype"])}
    pos, neg = (world["pos"], world["neg"]) if control else (world["pos_text"], world["neg_text"])
    with torch.inference_mode():
        out = s.Sampler.execute(model or world["model"], SEED, steps, CFG, sampler, scheduler, pos, neg, latent,
                                t.plan, 1.0, 1, sync)
    return out.args[0]["samples"]


def gradient_pass_counter(record):
    """APPLY_MODEL wrapper: the sigma of every model call that autograd runs through (the sync's gradient
    passes; the sampler's own evaluations run in inference mode)."""
    def wrapper(executor, x, t, *args, **kwargs):
        if torch.is_grad_enabled() and x.requires_grad:
            record.append(float(t.flatten()[0]))
        return executor(x, t, *args, **kwargs)
    return wrapper


def lpips_to_anchor(s, world, latent):
    """Per non-anchor window: LPIPS-alex between its decoded crop and the anchor window's."""
    loss = s.bridge.load_lpips("alex", "cpu")
    with torch.inference_mode():
        images = world["vae"].decode(latent).movedim(-1, 1) * 2 - 1
    crops = [images[..., x * 8:(x + 8) * 8] for x in STARTS]
    return [float(loss(c, crops[0])) for c in crops[1:]]


def test_every_offered_sampler_is_covered(s):
    import comfy.samplers
    assert set(comfy.samplers.KSampler.SAMPLERS) <= set(SAMPLERS) | set(REFUSED)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_syncs_once_per_step_and_moves_toward_the_anchor(s, small, sampler):
    import comfy.samplers
    if sampler not in comfy.samplers.KSampler.SAMPLERS:
        pytest.skip(f"{sampler} is not offered by this ComfyUI")
    world = small.world
    sigmas = comfy.samplers.KSampler(world["model"], STEPS, "cpu", sampler, "normal", 1.0).sigmas.tolist()
    record = []
    counted = world["model"].clone()
    counted.add_wrapper_with_key(s.pe.WrappersMP.APPLY_MODEL, "test.gradient_passes", gradient_pass_counter(record))
    sync = sync_settings(s, world, weight=200.0, decay=1.0, steps=SYNC_STEPS)
    synced = run(s, small, world, sampler, sync, model=counted, control=False)
    unsynced = run(s, small, world, sampler, control=False)
    before, after = lpips_to_anchor(s, world, unsynced), lpips_to_anchor(s, world, synced)
    print(f"[samplers] {sampler}: {len(record)} gradient passes; LPIPS to anchor per window without sync "
          f"{', '.join(f'{v:.4e}' for v in before)}, with sync {', '.join(f'{v:.4e}' for v in after)} "
          f"({', '.join(f'{100 * (b - a) / b:.2f}%' for a, b in zip(after, before))} lower)")
    expected = [sigma for sigma in sigmas[:SYNCED] for _ in STARTS[1:]]
    assert len(record) == SYNCED * (len(STARTS) - 1)
    assert record == pytest.approx(expected, rel=1e-5)
    assert bool(torch.isfinite(synced).all()) and bool(torch.isfinite(unsynced).all())
    # every window at least 1% nearer the anchor (a sync lost between a step's evaluations - DPM2's first
    # fold overwritten by its second - moved them by 0.00%)
    assert all(a < 0.99 * b for a, b in zip(after, before)), (before, after)


@pytest.mark.parametrize("sampler", REFUSED)
def test_samplers_without_fixed_steps_are_refused(s, small, sampler):
    world = small.world
    with pytest.raises(ValueError, match=rf"sync: the sampler '{sampler}' does not take one step per point of the "
                                         r"schedule .*choose another sampler or disconnect sync"):
        run(s, small, world, sampler, sync_settings(s, world, steps=SYNC_STEPS))


# --- against the papers' algorithm -----------------------------------------------------------------

EXACT_STEPS = 3
# 25 of 50 at 3 steps: floor(1.5 + 0.5) = 2 synced; w_t = 20 * 0.95^(t * 50 / 3)
HAND_WEIGHTS = [20.0, 20.0 * 0.95 ** (50 / 3), 0.0]


def cfg_guide(pred, sigma, x):
    return pred("negative") + CFG * (pred("positive") - pred("negative"))


PROMPT_SCALE = 20.0


@pytest.fixture(scope="module")
def worlds64(s, small):
    return (world_at(s, small.image, torch.float64, True, PROMPT_SCALE),
            world_at(s, small.image, torch.float64, False, PROMPT_SCALE))


def reference(world, image, guide=cfg_guide):
    conds = {"positive": (world["pos_text"][0][0], True), "negative": (world["neg_text"][0][0], True)}
    return WindowReference(world, image, STARTS, conds, guide)


def schedule(world, sampler, scheduler, steps=EXACT_STEPS):
    import comfy.samplers
    return comfy.samplers.KSampler(world["model"], steps, "cpu", sampler, scheduler, 1.0).sigmas


REFERENCE_STEP = {"euler": "euler", "ddim": "euler", "euler_cfg_pp": "cfg_pp",
                  "euler_ancestral": "euler_ancestral", "heun": "heun", "lcm": "lcm"}


def synced_and_unsynced(s, small, world, sampler, scheduler="normal"):
    settings = sync_settings(s, world, weight=20.0, decay=0.95, steps=SYNC_STEPS)
    return (run(s, small, world, sampler, settings, scheduler=scheduler, steps=EXACT_STEPS),
            run(s, small, world, sampler, scheduler=scheduler, steps=EXACT_STEPS))


@pytest.mark.parametrize("sampler,scheduler,contrast", [("ddim", "ddim_uniform", None), ("euler_cfg_pp", "normal", "euler"),
                                                       ("heun", "normal", "euler")])
def test_exact_samplers_equal_the_papers_algorithm(s, small, worlds64, sampler, scheduler, contrast):
    """euler with KSampler-style CFG is the same test in tests/test_guiders.py (and tests/test_sync.py)."""
    inference, plain = worlds64
    ours, unsynced = synced_and_unsynced(s, small, inference, sampler, scheduler)
    ref = reference(plain, small.image).sample(schedule(plain, sampler, scheduler), SEED, HAND_WEIGHTS,
                                               REFERENCE_STEP[sampler], LATENT)
    error, moved, scale = (ours - ref).abs().max().item(), (ours - unsynced).abs().max().item(), ref.abs().max().item()
    print(f"[samplers] {sampler}/{scheduler}: max |pack - reference| = {error:.2e} (relative {error / scale:.1e}); "
          f"sync moved the result by {moved:.3f}")
    assert moved > 1e-2 and error < 1e-6 * scale
    if contrast:  # the step's formula matters far above the tolerance (CFG++ steps with the unguided prediction)
        other = run(s, small, inference, contrast, scheduler=scheduler, steps=EXACT_STEPS)
        assert (unsynced - other).abs().max().item() > 100 * max(error, 1e-6 * scale)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "lcm"])
def test_approximate_samplers_measured_against_the_papers_algorithm(s, small, worlds64, sampler):
    """Not exact (README's table says why); the deviation from the per-window reference is measured."""
    inference, plain = worlds64
    ours, unsynced = synced_and_unsynced(s, small, inference, sampler)
    sigmas = schedule(plain, sampler, "normal")
    ref = reference(plain, small.image).sample(sigmas, SEED, HAND_WEIGHTS, REFERENCE_STEP[sampler], LATENT)
    ref_unsynced = reference(plain, small.image).sample(sigmas, SEED, [], REFERENCE_STEP[sampler], LATENT)
    scale = ref.abs().max().item()
    # without sync the reference's step is the pack's joint diffusion exactly: the reference is right
    assert (unsynced - ref_unsynced).abs().max().item() < 1e-6 * scale
    error, moved = (ours - ref).abs().max().item(), (ref - ref_unsynced).abs().max().item()
    print(f"[samplers] {sampler}: max |pack - reference| = {error:.3f}, sync moved the reference by {moved:.3f} "
          f"(deviation {100 * error / moved:.0f}% of the sync's effect; the pack's sync moved its result by "
          f"{(ours - unsynced).abs().max().item():.3f})")
    assert error > 100 * 1e-6 * scale  # an approximation indeed (the table would be wrong otherwise)
