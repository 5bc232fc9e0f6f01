"""AnchorSync with every guider a user can wire, each through the real ComfyUI node (ControlSync Sampler for
KSampler-style CFG; ControlSync Windowed Model + the guider node + SamplerCustomAdvanced for custom guiders;
model patches before the sampler), against the papers' algorithm with that guider's formula applied per
window (tests/window_reference.py), float64 models, euler:

  exact (equal to the reference within float32 rounding): KSampler-style CFG, cfg 1 (no negative), BasicGuider, CFGGuider,
      DualCFGGuider (regular and nested), Perturbed-Attention Guidance (with CFG and with nested DualCFG);
      CFG++ (euler_cfg_pp) in tests/test_samplers_sync.py.
  approximation (measured): PerpNegGuider (its projection runs over the whole canvas, not per window),
      RescaleCFG (its standard deviations likewise).
  refused with a message: Self-Attention Guidance.

Per-factor prompts reach the positive prompt only, also with DualCFG's three prompts (a hook on the UNet's
text context).
"""
from __future__ import annotations


import pytest
import torch

from test_samplers_sync import CANVAS_PX, LATENT, SEED, STARTS, world_at
from test_sync import s, sync_settings  # noqa: F401  (s: the shared fixture)
from window_reference import WindowReference

STEPS = 3
# sync_steps 25 of 50 at 3 steps, by hand: floor(1.5 + 0.5) = 2 synced steps, w_t = 20 * 0.95^(t * 50 / 3)
SYNC_STEPS = 25
HAND_WEIGHTS = [20.0, 20.0 * 0.95 ** (50 / 3), 0.0]
# PAG at 10. On the tiny model (a 4x4-token middle block) PAG's term moves the result by ~1e-3, only a few times
# the float32 rounding ComfyUI 0.33's model outputs carry (and any larger scale multiplies that rounding alike):
# the PAG rows' exactness is shown structurally as well (test_pag_calls_see_the_moved_windows)
CFG, CFG_CONDS, CFG_COND2_NEG, NEG_SCALE, PAG_SCALE, RESCALE = 7.5, 4.0, 2.5, 1.0, 10.0, 0.7
PROMPT_SCALE = 20.0  # see test_samplers_sync.world_at
# relative to the result's largest value: float64 models and sampler state (tiny_models.sample_in_model_dtype), but
# ComfyUI hands every model output back in float32 (BaseModel._apply_model since 0.33): ~1e-7 is seen, the
# guiders' formulas and the sync move the results by 1e-3 and more
EXACT = 1e-6


@pytest.fixture(scope="module")
def g(s):
    import tiny_models as tm
    from controlsync.nodes.controlsync_sampler import ControlSyncSampler
    from controlsync.nodes.window_planner import WindowPlanner
    from controlsync.nodes.windowed_model import ControlSyncWindowedModel

    class G:
        pass
    g = G()
    g.s, g.tm = s, tm
    g.image = tm.condition_image(*CANVAS_PX)
    g.plan = WindowPlanner.execute(CANVAS_PX[1], CANVAS_PX[0], 64, 64, 32, "first", 0, "uniform", image=g.image).args[0]
    g.Sampler, g.Windowed = ControlSyncSampler, ControlSyncWindowedModel
    g.inference = world_at(s, g.image, True, dtype=torch.float64, prompt_scale=PROMPT_SCALE)
    g.plain = world_at(s, g.image, False, dtype=torch.float64, prompt_scale=PROMPT_SCALE)
    for world in (g.inference, g.plain):  # two more prompts, no ControlNet: DualCFG's middle, PerpNeg's empty
        world["middle_text"] = [[tm.text_cond(12)[0][0].to(torch.float64) * PROMPT_SCALE, {}]]
        world["empty_text"] = [[tm.text_cond(13)[0][0].to(torch.float64) * PROMPT_SCALE, {}]]
    return g


def node(module, name, method, *args):
    """A ComfyUI node's first output, whichever node API this ComfyUI version gives it."""
    import importlib
    cls = getattr(importlib.import_module(module), name)
    with torch.inference_mode():
        if hasattr(cls, method):
            return getattr(cls(), method)(*args)[0]
        return cls.execute(*args).args[0]


def sampler_run(g, world, model, sync, cfg=CFG, sampler="euler"):
    latent = {"samples": torch.zeros(LATENT, dtype=world["dtype"])}
    with torch.inference_mode():
        return g.Sampler.execute(model, SEED, STEPS, cfg, sampler, "normal", world["pos"], world["neg"], latent,
                                 g.plan, 1.0, 1, sync).args[0]["samples"]


def custom_run(g, world, guider_of, sync, model=None, sampler="euler", plan=None):
    """ControlSync Windowed Model -> the guider node -> SamplerCustomAdvanced."""
    import comfy_extras.nodes_custom_sampler as cs
    with torch.inference_mode():
        windowed = g.Windowed.execute(model or world["model"], plan or g.plan, 1, sync).args[0]
        guider = guider_of(windowed)
        sigmas = cs.BasicScheduler().get_sigmas(windowed, "normal", STEPS, 1.0)[0]
        latent = {"samples": torch.zeros(LATENT, dtype=world["dtype"])}
        return cs.SamplerCustomAdvanced().sample(cs.RandomNoise().get_noise(SEED)[0], guider,
                                                 cs.KSamplerSelect().get_sampler(sampler)[0], sigmas,
                                                 latent)[0]["samples"]


def reference(g, guide, sync=True, fast=False):
    import comfy.samplers
    w = g.plain
    conds = {"positive": (w["pos_text"][0][0], True), "negative": (w["neg_text"][0][0], True),
             "middle": (w["middle_text"][0][0], False), "empty": (w["empty_text"][0][0], False)}
    sigmas = comfy.samplers.calculate_sigmas(w["model"].model.model_sampling, "normal", STEPS)
    return WindowReference(w, g.image, STARTS, conds, guide).sample("euler", sigmas, SEED, HAND_WEIGHTS if sync else [],
                                                                     LATENT, fast=fast, cfg_scale=CFG)


# --- the guiders' formulas, per window (their papers / ComfyUI's definitions) --------------------------

def cfg(pred, sigma, x):
    return pred("negative") + CFG * (pred("positive") - pred("negative"))


def positive_only(pred, sigma, x):
    return pred("positive")


def dual_regular(pred, sigma, x):
    n, m, p = pred("negative"), pred("middle"), pred("positive")
    return n + CFG_COND2_NEG * (m - n) + CFG_CONDS * (p - m)


def dual_nested(pred, sigma, x):
    n, m, p = pred("negative"), pred("middle"), pred("positive")
    return n + CFG_COND2_NEG * (m + CFG_CONDS * (p - m) - n)


def perp_neg(pred, sigma, x):
    """Perp-Neg (Armandpour et al.): the negative's component perpendicular to the positive direction,
    projected over the window."""
    e = pred("empty")
    pos, neg = pred("positive") - e, pred("negative") - e
    perp = neg - (neg * pos).sum() / pos.norm() ** 2 * pos
    return e + CFG * (pos - NEG_SCALE * perp)


def pag_after(guide):
    """Perturbed-Attention Guidance after a guider: + s (D_positive - D_positive with the middle block's
    self-attention replaced by the identity)."""
    def guided(pred, sigma, x):
        return guide(pred, sigma, x) + PAG_SCALE * (pred("positive") - pred("positive", perturbed=True))
    return guided


def dual_nested_pag(pred, sigma, x):
    """Nested DualCFG calls CFG (with its post-CFG functions) on positive vs middle, then mixes with the
    negative: PAG acts on the inner combination."""
    n, m, p = pred("negative"), pred("middle"), pred("positive")
    inner = m + CFG_CONDS * (p - m) + PAG_SCALE * (p - pred("positive", perturbed=True))
    return n + CFG_COND2_NEG * (inner - n)


def rescale_cfg(pred, sigma, x):
    """RescaleCFG (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 2): CFG in
    v-prediction, rescaled to the positive prediction's standard deviation, mixed by the multiplier."""
    s = sigma.reshape(-1, 1, 1, 1).to(x)
    scale = (s ** 2 + 1).sqrt()
    z = x / (s ** 2 + 1)  # the VP latent's mean part, as ComfyUI's node writes it

    def v(x0):
        return (z - x0) * scale / s
    v_pos, v_neg = v(pred("positive")), v(pred("negative"))
    v_cfg = v_neg + CFG * (v_pos - v_neg)
    rescaled = v_cfg * v_pos.std(dim=(1, 2, 3), keepdim=True) / v_cfg.std(dim=(1, 2, 3), keepdim=True)
    v_final = RESCALE * rescaled + (1 - RESCALE) * v_cfg
    return z - v_final * s / scale


# --- the runs, through the nodes ---------------------------------------------------------------------

def cfg_guider(world):
    return lambda m: node("comfy_extras.nodes_custom_sampler", "CFGGuider", "get_guider", m, world["pos"], world["neg"], CFG)


def basic_guider(world):
    return lambda m: node("comfy_extras.nodes_custom_sampler", "BasicGuider", "get_guider", m, world["pos"])


def dual_guider(world, style):
    def make(m):
        args = [m, world["pos"], world["middle_text"], world["neg"], CFG_CONDS, CFG_COND2_NEG]
        return node("comfy_extras.nodes_custom_sampler", "DualCFGGuider", "get_guider", *args, style)
    return make


def perp_neg_guider(world):
    return lambda m: node("comfy_extras.nodes_perpneg", "PerpNegGuider", "get_guider", m, world["pos"], world["neg"],
                          world["empty_text"], CFG, NEG_SCALE)


def pag(model):
    return node("comfy_extras.nodes_pag", "PerturbedAttentionGuidance", "patch", model, PAG_SCALE)


def rescale(model):
    return node("comfy_extras.nodes_model_advanced", "RescaleCFG", "patch", model, RESCALE)


def pack(g, kind, sync, fast=False):
    w = g.inference
    gradient = "skip model Jacobian" if fast else "exact"
    settings = sync_settings(g.s, w, weight=20.0, decay=0.95, steps=SYNC_STEPS, gradient=gradient) if sync else None
    if kind == "ksampler_cfg":
        return sampler_run(g, w, w["model"], settings)
    if kind == "ksampler_cfg1":
        return sampler_run(g, w, w["model"], settings, cfg=1.0)
    if kind == "basic":
        return custom_run(g, w, basic_guider(w), settings)
    if kind == "cfg_guider":
        return custom_run(g, w, cfg_guider(w), settings)
    if kind in ("dual_regular", "dual_nested"):
        return custom_run(g, w, dual_guider(w, kind.split("_")[1]), settings)
    if kind == "pag_ksampler_cfg":
        return sampler_run(g, w, pag(w["model"]), settings)
    if kind == "pag_dual_nested":
        return custom_run(g, w, dual_guider(w, "nested"), settings, model=pag(w["model"]))
    if kind == "perp_neg":
        return custom_run(g, w, perp_neg_guider(w), settings)
    if kind == "rescale_cfg":
        return sampler_run(g, w, rescale(w["model"]), settings)
    raise ValueError(kind)


FORMULA = {"ksampler_cfg": cfg, "ksampler_cfg1": positive_only, "basic": positive_only, "cfg_guider": cfg,
           "dual_regular": dual_regular, "dual_nested": dual_nested, "pag_ksampler_cfg": pag_after(cfg),
           "pag_dual_nested": dual_nested_pag, "perp_neg": perp_neg, "rescale_cfg": rescale_cfg}


# for each exact guider, one whose formula differs: their results must differ far above the tolerance (PAG's term
# is too small for that on the tiny model: None, see PAG_SCALE)
CONTRAST = {"ksampler_cfg": "ksampler_cfg1", "ksampler_cfg1": "ksampler_cfg", "basic": "cfg_guider",
            "cfg_guider": "basic", "dual_regular": "dual_nested", "dual_nested": "dual_regular",
            "pag_ksampler_cfg": None, "pag_dual_nested": None}


@pytest.mark.parametrize("kind", list(CONTRAST))
def test_guider_is_exact(g, kind):
    ours, unsynced = pack(g, kind, True), pack(g, kind, False)
    ref = reference(g, FORMULA[kind])
    error, moved, scale = (ours - ref).abs().max().item(), (ours - unsynced).abs().max().item(), ref.abs().max().item()
    print(f"[guiders] {kind}: max |pack - reference| = {error:.2e} (relative {error / scale:.1e}); "
          f"sync moved the result by {moved:.3f}")
    assert error < EXACT * scale and moved > 20 * EXACT * scale
    if CONTRAST[kind] is not None:  # the test tells the guiders' formulas apart
        formula = (unsynced - pack(g, CONTRAST[kind], False)).abs().max().item()
        print(f"[guiders] {kind}: {CONTRAST[kind]} instead changes the result by {formula:.3f}")
        assert formula > 10 * EXACT * scale


def test_pag_calls_see_the_moved_windows(g):
    """PAG's perturbed model call of an evaluation (its post-CFG function calls the model again) sees exactly the
    windows the evaluation's denoising pass sees - at a synced step, the moved ones - and syncs nothing more:
    an APPLY_MODEL hook records every window latent of every call."""
    calls = []

    def record(executor, x, t, *args, **kwargs):
        options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})  # apply_model's 6th
        perturbed = bool(options.get("patches_replace", {}).get("attn1"))
        calls.append((x.detach().clone(), perturbed, x.requires_grad))
        return executor(x, t, *args, **kwargs)
    w = g.inference
    model = pag(w["model"]).clone()
    model.add_wrapper_with_key(g.s.pe.WrappersMP.APPLY_MODEL, "test.pag", record)
    sampler_run(g, w, model, sync_settings(g.s, w, weight=20.0, decay=0.95, steps=SYNC_STEPS))
    plain = [x for x, perturbed, grad in calls if not perturbed and not grad]
    perturbed = [x for x, p, grad in calls if p and not grad]
    # every window of every evaluation gets PAG's positive-only call, at a latent its cond+uncond call saw
    assert len(perturbed) >= len(STARTS) * STEPS
    assert all(any(torch.equal(p, x[:1]) for x in plain) for p in perturbed)
    gradient = [grad for _, p, grad in calls if grad]
    assert len(gradient) == 2 * (len(STARTS) - 1) * 2  # 2 synced steps x 2 windows, each CFG + PAG's call


def test_perturbed_attention_guidance_in_the_fast_mode_is_exact(g):
    """AnchorSync's fast mode ('skip model Jacobian': one model evaluation per window and step, a moved window's
    predictions taken as its unmoved ones minus the move) with PAG's second model call in the same evaluation."""
    ours, unsynced = pack(g, "pag_ksampler_cfg", True, fast=True), pack(g, "pag_ksampler_cfg", False)
    ref = reference(g, FORMULA["pag_ksampler_cfg"], fast=True)
    error, moved, scale = (ours - ref).abs().max().item(), (ours - unsynced).abs().max().item(), ref.abs().max().item()
    print(f"[guiders] pag_ksampler_cfg, fast mode: max |pack - reference| = {error:.2e} (relative {error / scale:.1e}); "
          f"sync moved the result by {moved:.3f}")
    assert moved > 1e-2 and error < EXACT * scale


@pytest.mark.parametrize("kind", ["perp_neg", "rescale_cfg"])
def test_guider_is_an_approximation_measured(g, kind):
    """The guider's math runs on the merged canvas, where the reference runs it per window; measured without
    sync (the guider's own canvas-vs-window difference) and with sync, against the sync's own effect."""
    ours, unsynced = pack(g, kind, True), pack(g, kind, False)
    ref, ref_unsynced = reference(g, FORMULA[kind]), reference(g, FORMULA[kind], sync=False)
    canvas_vs_windows = (unsynced - ref_unsynced).abs().max().item()
    error = (ours - ref).abs().max().item()
    moved = (ref - ref_unsynced).abs().max().item()
    scale = ref.abs().max().item()
    effect = ((ours - unsynced) - (ref - ref_unsynced)).abs().max().item()
    print(f"[guiders] {kind}: without sync max |pack - per-window reference| = {canvas_vs_windows:.3f}; with sync "
          f"{error:.3f} (values up to {scale:.0f}); sync moved the reference by {moved:.3f}; the sync's effect in "
          f"the pack differs from the reference's by {effect:.2e}")
    assert 1e-5 * scale < error < 2e-4 * scale  # not exact (else the README's table should say so), and this close
    assert effect < 0.01 * moved  # the sync's own effect is the reference's: the deviation is the guider's math
    assert bool(torch.isfinite(ours).all())


def test_self_attention_guidance_is_refused(g):
    w = g.inference
    sag = node("comfy_extras.nodes_sag", "SelfAttentionGuidance", "patch", w["model"], 0.5, 2.0)
    message = r"model: Self-Attention Guidance .*Remove the Self-Attention Guidance node"
    settings = sync_settings(g.s, w, steps=SYNC_STEPS)
    with pytest.raises(ValueError, match=message):
        sampler_run(g, w, sag, settings)
    with pytest.raises(ValueError, match=message):  # at the windowed-model node
        g.Windowed.execute(sag, g.plan, 1, settings)
    with torch.inference_mode():  # patched after windowing: refused when sampling starts
        windowed_then_sag = node("comfy_extras.nodes_sag", "SelfAttentionGuidance", "patch",
                                 g.Windowed.execute(w["model"], g.plan, 1, None).args[0], 0.5, 2.0)
    with pytest.raises(ValueError, match=message):
        custom_run(g, w, lambda m: cfg_guider(w)(windowed_then_sag), None)


# --- per-factor prompts go to the positive prompt only ---------------------------------------------------

class ContextRecorder:
    """APPLY_MODEL wrapper: every row of the UNet's text context, and whether autograd runs through the call."""

    def __init__(self):
        self.rows = []

    def __call__(self, executor, x, t, c_concat, c_crossattn, *args, **kwargs):
        for row in c_crossattn:
            self.rows.append((row.detach().clone(), x.requires_grad))
        return executor(x, t, c_concat, c_crossattn, *args, **kwargs)


def test_per_factor_prompts_replace_the_positive_only_with_dual_cfg(g):
    from controlsync.nodes import bridge
    from controlsync.nodes.factor_graph_collage import FactorGraphCollage
    s, w, tm = g.s, g.inference, g.tm
    factor_conditioning = tm.text_cond(20) + tm.text_cond(21) + tm.text_cond(22)
    plan = FactorGraphCollage.execute("chain", CANVAS_PX[1], CANVAS_PX[0], 64, 64, 32, "horizontal", 0, "per factor",
                                      factor_conditioning=factor_conditioning).args[0]
    layout = bridge.layout_for(plan, w["model"], LATENT)
    region_prompts = [p.to(torch.float64) for p in layout.prompts]
    assert len(layout.regions) == 5 and torch.equal(region_prompts[1].float(), tm.text_cond(21)[0][0])
    recorder = ContextRecorder()
    model = w["model"].clone()
    model.add_wrapper_with_key(s.pe.WrappersMP.APPLY_MODEL, "test.contexts", recorder)
    custom_run(g, w, dual_guider(w, "regular"), sync_settings(s, w, steps=50), model=model, plan=plan)
    positive, middle, negative = w["pos_text"][0][0][0], w["middle_text"][0][0][0], w["neg_text"][0][0][0]

    def count(embedding, grad=None):
        return sum(torch.equal(row, embedding) for row, g_ in recorder.rows if grad is None or g_ == grad)
    regions = [count(p[0]) for p in region_prompts]
    print(f"[guiders] DualCFG + per-factor prompts: rows per region prompt {regions}, middle {count(middle)}, "
          f"negative {count(negative)}, the sampler's positive {count(positive)}")
    assert count(positive) == 0  # replaced everywhere by the regions' own prompts
    assert all(n > 0 for n in regions)
    assert count(middle) == count(negative) == sum(regions) == len(recorder.rows) // 3
    # the gradient passes (factors 1 and 2, non-anchor) see their own prompt with the middle and negative
    assert count(region_prompts[1][0], True) == count(region_prompts[2][0], True) > 0
    assert count(middle, True) == count(negative, True) == 2 * count(region_prompts[1][0], True)
