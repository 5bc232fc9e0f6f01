"""Every model family through the same nodes, inside the real ComfyUI, on tiny seeded models
(tests/tiny_families.py): SDXL eps and v-prediction, SD3.5, Flux and Qwen-Image, each with the ControlNets
of its kind (and Flux Tools' concat conditioning); ComfyUI 0.33's Flux.2 [dev] and [klein], Z-Image, Qwen-Image
Edit, Chroma and HiDream (Flux.2 [klein] and Qwen-Image Edit with a canvas-sized reference latent).

Per family: one full-canvas window equals KSampler bit for bit; the hint (or concat latent) reaching each
window's ControlNet is the window's crop of the canvas condition (hooks on the real modules); windows sit on
the model's patch grid and are images of their own (positions); AnchorSync steps in the model's own
parameterisation, equal to the paper's algorithm written out below (float64) and to finite differences of
its loss, and lowers the windows' LPIPS to the anchor; a factor-graph loop has no seam.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from lpips_weights import reference_lpips

CANVAS_PX = (64, 192)
WINDOW_PX, STRIDE_PX, WINDOWS = 64, 32, 5  # 64 px windows every 32 px


def cell(family):
    """Pixels per latent cell (Flux.2: 16)."""
    return 16 if family.startswith("flux2") else 8


def latent_hw(family, px=CANVAS_PX):
    return px[0] // cell(family), px[1] // cell(family)


def window_cells(family):
    return WINDOW_PX // cell(family)


def starts(family):
    """The windows' first columns, in latent cells."""
    return [k * STRIDE_PX // cell(family) for k in range(WINDOWS)]


# (family, control): every ControlNet kind of each family; "concat" is Flux Tools' concatenated condition latent;
# "none": the family has no ControlNet in ComfyUI 0.33; "reference": a canvas-sized reference latent (edit models)
CASES = [("sdxl", "controlnet"), ("sdxl", "control_lora"), ("sdxl_v", "controlnet"), ("sd35", "sd35"),
         ("flux", "instantx"), ("flux", "union"), ("flux", "xlabs"), ("flux", "concat"), ("qwen", "qwen"),
         ("flux2", "none"), ("flux2_klein", "reference"), ("zimage", "none"), ("qwen_edit", "reference"),
         ("qwen_edit", "qwen_fun"), ("chroma", "none"), ("hidream", "none")]
CONTROL_CASES = [c for c in CASES if c[1] not in ("none", "reference")]
# Flux, Flux.2 [dev] and Z-Image Turbo (guidance-distilled) sample at cfg 1
CFG = {"sdxl": 5.0, "sdxl_v": 5.0, "sd35": 4.0, "flux": 1.0, "qwen": 2.5, "flux2": 1.0, "flux2_klein": 3.0,
       "zimage": 1.0, "qwen_edit": 2.5, "chroma": 4.0, "hidream": 3.0}
DEFAULT_CONTROL = {"sdxl": "controlnet", "sdxl_v": "controlnet", "sd35": "sd35", "flux": "instantx", "qwen": "qwen",
                   "flux2": "none", "flux2_klein": "reference", "zimage": "none", "qwen_edit": "reference",
                   "chroma": "none", "hidream": "none"}
PATCH = {"sdxl": 1, "sdxl_v": 1, "sd35": 2, "flux": 2, "qwen": 2, "flux2": 1, "flux2_klein": 1, "zimage": 2,
         "qwen_edit": 2, "chroma": 2, "hidream": 2}
GUIDANCE = ("flux", "flux2")  # guidance-distilled: FluxGuidance sets the guidance the model embeds
PIXEL_HINTS = ("controlnet", "control_lora", "xlabs")  # the rest encode the hint with the VAE


@pytest.fixture(scope="module")
def f(comfy):
    import comfy.patcher_extension
    import nodes
    import lpips_weights
    import tiny_families as tf
    import tiny_models as tm
    from controlsync.nodes import bridge
    from controlsync.nodes.anchor_sync import AnchorSync
    from controlsync.nodes.controlsync_sampler import ControlSyncSampler
    from controlsync.nodes.factor_graph_collage import FactorGraphCollage
    from controlsync.nodes.window_planner import WindowPlanner
    from controlsync.nodes.windowed_model import ControlSyncWindowedModel

    lpips_weights.use_cached_backbones()

    class F:
        pass
    f = F()
    f.nodes, f.tf, f.tm, f.pe, f.bridge = nodes, tf, tm, comfy.patcher_extension, bridge
    f.Planner, f.Sampler, f.Sync, f.Collage, f.Windowed = (WindowPlanner, ControlSyncSampler, AnchorSync,
                                                           FactorGraphCollage, ControlSyncWindowedModel)
    f.image = tm.condition_image(*CANVAS_PX)
    f.plan = WindowPlanner.execute(192, 64, 64, 64, 32, "first", 0, "uniform").args[0]
    f.full = WindowPlanner.execute(192, 64, 192, 64, 64, "first", 0, "uniform").args[0]
    f.worlds = {}
    return f


# --- the worlds ----------------------------------------------------------------------------------

def to_dtype(f, world, dtype):
    """Models, ControlNet, VAE and conditioning in `dtype` (float64 for the exact checks)."""
    base = world["model"].model
    base.to(dtype)
    base.diffusion_model.dtype = dtype
    base.manual_cast_dtype = None
    base.model_config.unet_config["dtype"] = dtype
    f.tm.sample_in_model_dtype(world["model"], dtype)  # ComfyUI 0.33's sampler runs in float32 otherwise
    control = world["control"]
    if control is not None and getattr(control, "control_model", None) is not None:
        control.control_model.to(dtype)
        control.control_model.dtype = dtype
    world["vae"].first_stage_model.to(dtype)
    world["vae"].vae_dtype = dtype


def build(f, family, control="default", dtype=torch.float32, inference=True):
    """Model, VAE, ControlNet and conds of a family; under inference mode as ComfyUI's executor builds them,
    or plain tensors for the reference loop (same seeds, same weights)."""
    import comfy_extras.nodes_controlnet as ncn
    import comfy_extras.nodes_flux as nflux
    from comfy_extras.nodes_edit_model import ReferenceLatent
    from comfy_extras.nodes_ip2p import InstructPixToPixConditioning
    tf = f.tf
    control = DEFAULT_CONTROL[family] if control == "default" else control
    ctx = torch.inference_mode() if inference else torch.no_grad()
    with ctx:
        world = {"family": family, "kind": control, "dtype": dtype, "cfg": CFG[family]}
        world["model"] = tf.model(family, in_channels=32 if control == "concat" else None)
        world["vae"] = tf.vae(family)
        world["control"] = {"controlnet": tf.sdxl_controlnet, "control_lora": tf.sdxl_control_lora,
                            "sd35": tf.sd35_controlnet, "qwen": tf.qwen_controlnet, "concat": lambda: None,
                            "none": lambda: None, "reference": lambda: None, "qwen_fun": tf.qwen_fun_controlnet,
                            "instantx": lambda: tf.flux_controlnet("instantx"), "union": lambda: tf.flux_controlnet("union"),
                            "xlabs": lambda: tf.flux_controlnet("xlabs")}[control]()
        if control == "union":
            world["control"] = ncn.SetUnionControlNetType().set_controlnet_type(world["control"],
                                                                                "canny/lineart/anime_lineart/mlsd")[0]
        if dtype != torch.float32:
            to_dtype(f, world, dtype)

        def cast(cond):
            return [[t.to(dtype), {k: (v.to(dtype) if torch.is_tensor(v) else v) for k, v in d.items()}] for t, d in cond]
        if family in GUIDANCE:  # cfg 1 with FluxGuidance; the negative is never evaluated at cfg 1
            pos = nflux.FluxGuidance.execute(cast(tf.text_cond(family, 10, guidance=None)), 3.5).args[0]
            neg = f.nodes.ConditioningZeroOut().zero_out(pos)[0]
        else:
            pos, neg = cast(tf.text_cond(family, 10)), cast(tf.text_cond(family, 11))
        world["pos_text"], world["neg_text"] = pos, neg
        image = f.image.to(dtype)
        if control == "concat":
            pos, neg, _ = InstructPixToPixConditioning.execute(pos, neg, image, world["vae"]).args
        elif control == "reference":  # the image being edited: its VAE latent, canvas-sized, on both prompts
            world["reference"] = world["vae"].encode(image)
            pos, neg = (ReferenceLatent.execute(c, {"samples": world["reference"]}).args[0] for c in (pos, neg))
        elif control != "none":
            pos, neg = f.nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, world["control"], image, 1.0, 0.0,
                                                                          1.0, vae=world["vae"])
        world["pos"], world["neg"] = pos, neg
        channels = world["model"].model.latent_format.latent_channels
        world["latent"] = {"samples": torch.zeros(1, channels, *latent_hw(family), dtype=dtype)}
    return world


def world(f, family, control="default"):
    key = (family, control)
    if key not in f.worlds:
        f.worlds[key] = build(f, family, control)
    return f.worlds[key]


def sample(f, w, plan=None, sync=None, sampler="euler", scheduler="simple", steps=3, seed=5, pos=None, neg=None, batch=0):
    with torch.inference_mode():
        return f.Sampler.execute(w["model"], seed, steps, w["cfg"], sampler, scheduler, pos or w["pos"], neg or w["neg"],
                                 w["latent"], plan or f.plan, 1.0, batch, sync).args[0]["samples"]


def ksampler(f, w, sampler="euler", scheduler="simple", steps=3, seed=5):
    with torch.inference_mode():
        return f.nodes.common_ksampler(w["model"], seed, steps, w["cfg"], sampler, scheduler, w["pos"], w["neg"],
                                       w["latent"])[0]["samples"]


def sync_settings(f, w, weight=20.0, decay=0.95, steps=50):
    with torch.inference_mode():
        return f.Sync.execute(w["vae"], weight, decay, steps, "alex", "exact").args[0]


# --- parameterisation ----------------------------------------------------------------------------

def test_step_scale_is_alpha_squared_plus_sigma_squared(comfy):
    from controlsync.sampling.sync import step_scale
    assert step_scale("ve", 2.0) == 5.0 and step_scale("ve", 0.0) == 1.0
    assert step_scale("flow", 0.25) == 0.625 and step_scale("flow", 1.0) == 1.0 and step_scale("flow", 0.5) == 0.5
    with pytest.raises(ValueError, match="unknown parameterisation 'x0'"):
        step_scale("x0", 1.0)


def test_parameterisation_is_read_from_the_model(f):
    import comfy.model_sampling
    import comfy_extras.nodes_model_advanced as adv
    expected = {"sdxl": "ve", "sdxl_v": "ve", "sd35": "flow", "flux": "flow", "qwen": "flow"}
    for family, name in expected.items():
        model = f.tf.model(family)
        assert f.bridge.parameterisation(model) == name, family
        assert f.bridge.parameterisation(model.model) == name, family
    sdxl = f.tf.model("sdxl")
    assert isinstance(f.tf.model("sdxl_v").model.model_sampling, comfy.model_sampling.V_PREDICTION)
    # ModelSampling* nodes patch model_sampling on a clone: the patched one is what counts
    assert f.bridge.parameterisation(adv.ModelSamplingSD3().patch(sdxl, 3.0)[0]) == "flow"
    assert f.bridge.parameterisation(adv.ModelSamplingDiscrete().patch(sdxl, "v_prediction", False)[0]) == "ve"
    assert f.bridge.parameterisation(sdxl) == "ve"

    class CosmosSampling(comfy.model_sampling.ModelSamplingContinuousEDM, comfy.model_sampling.COSMOS_RFLOW):
        pass
    cosmos = sdxl.clone()
    cosmos.add_object_patch("model_sampling", CosmosSampling(sdxl.model.model_config))
    w = world(f, "sdxl")
    with pytest.raises(ValueError, match=r"sync: AnchorSync .* this MODEL samples with ModelSamplingContinuousEDM \+ "
                                         r"COSMOS_RFLOW\. Sample it without AnchorSync"):
        sample(f, dict(w, model=cosmos), sync=sync_settings(f, w))
    with pytest.raises(ValueError, match="COSMOS_RFLOW"):
        f.Windowed.execute(cosmos, f.plan, 0, sync_settings(f, w))
    assert f.Windowed.execute(cosmos, f.plan, 0).args[0] is not None  # without sync any parameterisation samples


# --- one window = KSampler -----------------------------------------------------------------------

@pytest.mark.parametrize("family,control", CASES)
def test_one_full_window_equals_ksampler_bit_for_bit(f, family, control):
    w = world(f, family, control)
    ref = ksampler(f, w)
    ours = sample(f, w, plan=f.full)
    windows = sample(f, w)
    print(f"[families] {family}/{control}: one full-canvas window vs KSampler: max |diff| "
          f"{(ours - ref).abs().max().item():.1e} (bit-equal {torch.equal(ours, ref)})")
    assert torch.equal(ours, ref)
    assert windows.shape == ref.shape and bool(torch.isfinite(windows).all()) and not torch.equal(windows, ref)


def test_flux_basic_guider_windowed_equals_sampler_node(f):
    """Flux's custom-sampling graph: BasicGuider (no negative), FluxGuidance, SamplerCustomAdvanced on the
    windowed model; one full window equals the plain graph, and windows equal ControlSync Sampler at cfg 1."""
    import comfy_extras.nodes_custom_sampler as cs
    w = world(f, "flux")

    def custom(model):
        with torch.inference_mode():
            guider = cs.BasicGuider().get_guider(model, w["pos"])[0]
            sigmas = cs.BasicScheduler().get_sigmas(model, "simple", 3, 1.0)[0]
            return cs.SamplerCustomAdvanced().sample(cs.RandomNoise().get_noise(5)[0], guider,
                                                     cs.KSamplerSelect().get_sampler("euler")[0], sigmas,
                                                     w["latent"])[0]["samples"]
    with torch.inference_mode():
        full = f.Windowed.execute(w["model"], f.full, 0).args[0]
        windowed = f.Windowed.execute(w["model"], f.plan, 0).args[0]
    assert torch.equal(custom(full), custom(w["model"]))
    assert torch.equal(custom(windowed), sample(f, w))


# --- the condition reaching each window ----------------------------------------------------------

def canvas_pixels(f, control):
    """The condition image at canvas size, resized the way ComfyUI resizes it for a full-canvas call."""
    import comfy.utils
    return comfy.utils.common_upscale(f.image.movedim(-1, 1), CANVAS_PX[1], CANVAS_PX[0],
                                      getattr(control, "upscale_algorithm", "nearest-exact"), "center")


def _hooked_modules(w):
    """The real modules a window's condition enters: the ControlNet's network (a Control-LoRA builds its
    network when sampling starts: every cldm ControlNet forward), or Flux Tools' diffusion model."""
    import comfy.cldm.cldm
    if w["kind"] == "concat":
        return lambda m: m is w["model"].model.diffusion_model
    if w["kind"] == "control_lora":
        return lambda m: isinstance(m, comfy.cldm.cldm.ControlNet)
    return lambda m: m is w["control"].control_model


@pytest.mark.parametrize("family,control", CONTROL_CASES)
def test_condition_reaching_each_window_is_its_crop_of_the_canvas_condition(f, family, control):
    """Hook on the real module: the hint each window's ControlNet gets is the window's crop of the canvas hint
    (pixels), or ComfyUI's VAE encoding of that pixel crop (ControlNets taking latents: each window is its own
    image); for Flux Tools, the condition latent concatenated to each window is the window's crop of the canvas
    condition latent."""
    w = world(f, family, control)
    hits = []
    wanted = _hooked_modules(w)

    def hook(module, args, kwargs, out):
        if wanted(module):
            hits.append(args[0][:, 16:].clone() if w["kind"] == "concat" else kwargs["hint"].clone())
    handle = torch.nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
    try:
        sample(f, w, steps=1, batch=1)
    finally:
        handle.remove()
    assert len(hits) == WINDOWS
    vae, base = w["vae"], w["model"].model
    with torch.inference_mode():
        if control == "concat":
            canvas = base.process_latent_in(vae.encode(f.image))
        pixels = canvas_pixels(f, w["control"])
        for start, hint in zip(starts(family), hits):
            if control == "concat":
                expected = canvas[..., start:start + 8]
            elif control in PIXEL_HINTS:
                expected = pixels[..., start * 8:(start + 8) * 8]
            else:
                crop = pixels[..., start * 8:(start + 8) * 8]
                expected = w["control"].latent_format.process_in(vae.encode(crop.movedim(1, -1)))
            assert hint.shape[-2:] == expected.shape[-2:] == (8, 8) if control not in PIXEL_HINTS else True
            assert torch.equal(hint[0], expected[0].to(hint.dtype)), (family, control, start)


# --- patch grid and positions ------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sdxl", "sd35", "flux", "qwen", "flux2", "zimage", "chroma", "hidream"])
def test_windows_sit_on_the_models_patch_grid(f, family):
    """latent_geometry reads the model's VAE factor and patch size; window sizes, strides and overlaps are laid out
    in whole patches, so every window's tokens are the canvas's tokens; a canvas off the patch grid is refused.
    Flux.2 (16 px cells, patch 1): sizes that are not whole 16 px cells are refused."""
    model = world(f, family)["model"]
    patch, px = PATCH[family], cell(family)
    assert f.bridge.latent_geometry(model) == (px, patch)
    odd = f.Planner.execute(192, 64, 7 * px, 64, 3 * px, "first", 0, "uniform").args[0]  # 7-cell windows, 3-cell stride
    loop = f.Collage.execute("cycle", 192, 64, 64, 64, 5 * px if px == 8 else 48, "horizontal", 0).args[0]  # 5 or 3 cells
    for plan in (odd, loop):
        layout = f.bridge.layout_for(plan, model, (1, 16) + latent_hw(family))
        for region in layout.regions:
            assert all(v % patch == 0 for p in region.pieces for v in p.src + p.size), (family, region)
    if px == 16:
        with pytest.raises(ValueError, match="window_width = 56 px is not a multiple of this model's 16 px latent cell"):
            f.bridge.layout_for(f.Planner.execute(192, 64, 56, 64, 24, "first", 0, "uniform").args[0], model, (1, 128, 4, 12))
        return
    with pytest.raises(ValueError, match="patch") if patch > 1 else _no_error():
        f.bridge.layout_for(f.Planner.execute(200, 64, 64, 64, 32, "first", 0, "uniform").args[0], model, (1, 16, 8, 25))


class _no_error:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _recorded_ids(module, run):
    """The position ids a RoPE embedder gets, per call (EmbedND(ids); Z-Image calls it for the text and the image)."""
    calls = []
    handle = module.register_forward_hook(lambda m, args, out: calls.append(args[0].clone()))
    try:
        run()
    finally:
        handle.remove()
    return calls


@pytest.mark.parametrize("family", ["flux", "qwen", "flux2", "flux2_klein", "zimage", "chroma", "hidream"])
def test_dit_windows_get_the_positions_of_an_image_of_their_own(f, family):
    """Every window is a model-sized image of its own (window-local RoPE positions), as MultiDiffusion does for
    UNets: the position ids each window's model call gets are exactly those of a plain KSampler run on a
    window-sized latent; the windows are not at canvas positions (the second window's ids equal the first's)."""
    w = dict(world(f, family))
    w["pos"], w["neg"] = w["pos_text"], w["neg_text"]  # the text only: the ids are those of the image and its prompt
    net = w["model"].model.diffusion_model
    embedder = getattr(net, "pe_embedder", None) or net.rope_embedder
    windowed = _recorded_ids(embedder, lambda: sample(f, w, steps=1, batch=1))
    size = window_cells(family)
    standalone_world = dict(w, latent={"samples": torch.zeros(1, w["latent"]["samples"].shape[1], size, size)})
    alone = _recorded_ids(embedder, lambda: ksampler(f, standalone_world, steps=1))
    assert len(alone) >= 1 and len(windowed) == WINDOWS * len(alone)
    for k, ids in enumerate(windowed):
        assert torch.equal(ids, alone[k % len(alone)]), (family, k)


# --- reference latents (edit models): the image being edited, cropped per window -----------------------

@pytest.mark.parametrize("family", ["qwen_edit", "flux2_klein"])
def test_a_canvas_sized_reference_latent_reaches_each_window_as_its_crop(f, family):
    """Hook on the real diffusion model: a reference latent of the canvas latent's size (ReferenceLatent with the
    VAE latent of the image being edited) describes the canvas, so each window's call gets the window's crop of
    it, as ComfyUI processes it (process_latent_in); a reference of any other size (a subject) reaches every
    window whole."""
    import comfy_extras.nodes_edit_model as edit
    w = world(f, family, "reference")
    net, base = w["model"].model.diffusion_model, w["model"].model
    subject = torch.randn((1,) + tuple(w["reference"].shape[1:-2]) + (3, 5), generator=torch.Generator().manual_seed(3))

    def references(pos, neg):
        calls = []
        handle = net.register_forward_hook(lambda m, a, kw, out: calls.append([r.clone() for r in kw["ref_latents"]]),
                                           with_kwargs=True)
        try:
            sample(f, w, pos=pos, neg=neg, steps=1, batch=1)
        finally:
            handle.remove()
        return calls

    with torch.inference_mode():
        canvas = base.process_latent_in(w["reference"])
        with_subject = [edit.ReferenceLatent.execute(c, {"samples": subject}).args[0] for c in (w["pos"], w["neg"])]
    calls = references(w["pos"], w["neg"])
    assert len(calls) == WINDOWS
    size = window_cells(family)
    for start, refs in zip(starts(family), calls):
        assert len(refs) == 1 and refs[0].shape[-2:] == (latent_hw(family)[0], size)
        expected = canvas[..., start:start + size]
        assert all(torch.equal(r, expected[0]) for r in refs[0]), (family, start)  # cond and uncond: the same crop
    for refs in references(*with_subject):
        assert torch.equal(refs[1], base.process_latent_in(subject).expand_as(refs[1]))  # whole, every window


# --- AnchorSync in each parameterisation: the paper's algorithm, written out -------------------------

def paper_step_scale(family, sigma):
    """The paper steps the variance-preserving latent z = x / sqrt(alpha^2 + sigma^2) of the sampler's
    x = alpha x0 + sigma eps: eps and v-prediction models sample x = x0 + sigma eps (alpha = 1), flow models
    x = (1 - sigma) x0 + sigma eps; z <- z - w grad_z L is x <- x - w (alpha^2 + sigma^2) grad_x L."""
    s = float(sigma)
    alpha = 1.0 if family in ("sdxl", "sdxl_v") else 1.0 - s
    return alpha ** 2 + s ** 2


def keep_saved_activations():
    """ComfyUI's model code adds in place to activations autograd saved (Flux's blocks, DiT ControlNet
    residuals): backward needs copies of them (values are unchanged)."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone() if t.requires_grad else t, lambda t: t)


class Reference:
    """SyncDiffusion's Algorithm 1 on a family's ComfyUI model objects, with no pack code: every window is
    its own image denoised by ComfyUI's own cond processing and CFG (its ControlNet fed the window's crop of
    the condition, an edit model's reference latent the window's crop of the image being edited, SDXL's size
    conditioning that of a crop of the canvas), the anchor decoded without
    gradient, every other window moved by one step of its LPIPS gradient in the model's parameterisation,
    each window's Euler step taken from its moved latent and the windows averaged."""

    def __init__(self, f, w):
        self.f, self.w = f, w
        self.model = w["model"].model
        w["model"].pre_run()  # what sampling does first: the model knows its patcher
        self.dtype = w["dtype"]
        self.patches = {"patches": {"input_block_patch_after_skip": [lambda h, o: h.clone()]}}
        self.lpips = reference_lpips("alex", self.dtype)
        self.conds = {}

    def window_conds(self, k):
        """ComfyUI's processed conds for window k, as for a KSampler run on the window alone."""
        import comfy.sampler_helpers
        import comfy.samplers
        if k in self.conds:
            return self.conds[k]
        from comfy_extras.nodes_edit_model import ReferenceLatent
        w, start, size = self.w, starts(self.w["family"])[k], window_cells(self.w["family"])
        pos, neg = w["pos_text"], w["neg_text"]
        if w["family"] in ("sdxl", "sdxl_v"):  # a crop of the canvas: canvas size, crop offset, window size
            size_cond = {"width": CANVAS_PX[1], "height": CANVAS_PX[0], "crop_w": start * 8, "crop_h": 0,
                         "target_width": 64, "target_height": 64}
            pos, neg = ([[t, dict(d, **size_cond)] for t, d in c] for c in (pos, neg))
        if w["kind"] == "reference":  # the window's own part of the image being edited
            crop = {"samples": w["reference"][..., start:start + size]}
            pos, neg = (ReferenceLatent.execute(c, crop).args[0] for c in (pos, neg))
        elif w["kind"] != "none":
            crop = canvas_pixels(self.f, w["control"])[..., start * 8:(start + 8) * 8].movedim(1, -1).to(self.dtype)
            pos, neg = self.f.nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, w["control"], crop, 1.0, 0.0,
                                                                               1.0, vae=w["vae"])
        noise = torch.zeros(self.window_shape(), dtype=self.dtype)
        conds = {"positive": comfy.sampler_helpers.convert_cond(pos), "negative": comfy.sampler_helpers.convert_cond(neg)}
        self.conds[k] = comfy.samplers.process_conds(self.model, noise, conds, "cpu", latent_image=noise, seed=5)
        return self.conds[k]

    def window_shape(self):
        shape = list(self.w["latent"]["samples"].shape)
        shape[-1] = window_cells(self.w["family"])
        if self.model.latent_format.latent_dimensions == 3:
            shape.insert(2, 1)
        return shape

    def denoise(self, x, sigma, k):
        import comfy.samplers
        conds = self.window_conds(k)
        t = sigma.reshape(1).to(x.dtype).expand(x.shape[0])
        return comfy.samplers.sampling_function(self.model, x, t, conds["negative"], conds["positive"], self.w["cfg"],
                                                model_options={"transformer_options": self.patches}, seed=5)

    def image(self, x0):
        image = self.w["vae"].first_stage_model.decode(self.model.latent_format.process_out(x0))
        if image.ndim == 5:  # a video VAE: one frame
            image = image[:, :, 0]
        return image.clamp(-1, 1)

    def loss(self, x, sigma, k, anchor_image):
        with keep_saved_activations():
            return self.lpips(self.image(self.denoise(x, sigma, k)), anchor_image, normalize=False).sum()

    def sample(self, steps, schedule, seed=5):
        import comfy.sample
        import comfy.samplers
        sampling = self.model.model_sampling
        sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", steps)  # float32, as the sampler has them
        latent = comfy.sample.fix_empty_latent_channels(self.w["model"], self.w["latent"]["samples"])
        noise = comfy.sample.prepare_noise(latent, seed)
        latent = self.model.process_latent_in(latent)
        max_sigma = float(sampling.sigma_max)
        max_denoise = abs(float(sigmas[0]) - max_sigma) <= 1e-5 * max_sigma or float(sigmas[0]) > max_sigma
        x = sampling.noise_scaling(sigmas[0], noise, latent, max_denoise=max_denoise).to(self.dtype)
        for i in range(steps):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            size, first = window_cells(self.w["family"]), starts(self.w["family"])
            windows = [x[..., s:s + size].to(self.dtype) for s in first]
            w_t = schedule.weight_at(i, steps)
            moved = list(windows)
            if w_t > 0:
                with torch.no_grad():
                    anchor_image = self.image(self.denoise(windows[0], sigma, 0))
                for k in range(1, len(windows)):
                    xk = windows[k].detach().requires_grad_(True)
                    with torch.enable_grad():
                        (g,) = torch.autograd.grad(self.loss(xk, sigma, k, anchor_image), xk)
                    moved[k] = windows[k] - w_t * paper_step_scale(self.w["family"], sigma) * g
            total, count = torch.zeros_like(x), torch.zeros_like(x)
            for k, xk in enumerate(moved):
                with torch.no_grad():
                    d = self.denoise(xk, sigma, k)
                # Euler (DDIM for eps and v; the flow's Euler step for flow models); the step size
                # sigma_next - sigma is taken in float32, as k-diffusion takes it from the schedule
                stepped = xk + (xk - d) / sigma * (sigma_next - sigma)
                total[..., first[k]:first[k] + size] += stepped
                count[..., first[k]:first[k] + size] += 1
            x = total / count
        # ComfyUI hands the sampled latent back in float32
        return self.model.process_latent_out(sampling.inverse_noise_scaling(sigmas[-1], x).to(torch.float32))


@contextlib.contextmanager
def plain_torch_kernels():
    """ComfyUI 0.33 runs RoPE through comfy-kitchen kernels that take float16/bfloat16/float32 only and have no
    backward; `in_training` (what its own training node sets) selects the plain torch code, which runs in
    float64 and which autograd can differentiate (the pack sets it for its gradient passes)."""
    import comfy.model_management as mm
    before = getattr(mm, "in_training", None)
    if before is not None:
        mm.in_training = True
    try:
        yield
    finally:
        if before is not None:
            mm.in_training = before


def world64(f, family):
    key = (family, "float64")
    if key not in f.worlds:
        f.worlds[key] = (build(f, family, dtype=torch.float64), build(f, family, dtype=torch.float64, inference=False))
    return f.worlds[key]


# eps, v-prediction and flow (SD3.5: shift 3; Flux: cfg 1 with guidance; Qwen-Image: one-frame latents, Wan VAE;
# Flux.2: 128-channel latents at 1/16; Qwen-Image Edit and Flux.2 [klein]: a reference latent cropped per window)
SYNC_FAMILIES = ["sdxl", "sdxl_v", "sd35", "flux", "qwen", "flux2", "flux2_klein", "zimage", "qwen_edit", "chroma",
                 "hidream"]


@pytest.mark.parametrize("family", SYNC_FAMILIES)
def test_synced_run_equals_the_papers_algorithm_in_the_models_parameterisation(f, family):
    from controlsync.sampling.sync import SyncSchedule
    ours_world, plain = world64(f, family)
    schedule = SyncSchedule(100.0, 0.95, 50)  # w 100: a clear pull on the tiny random models
    with plain_torch_kernels():
        ref = Reference(f, plain).sample(2, schedule)
        ours = sample(f, ours_world, sync=sync_settings(f, ours_world, weight=100.0), batch=1, steps=2)
        unsynced = sample(f, ours_world, batch=1, steps=2)
    error = (ours - ref).abs().max().item()
    moved = (ours - unsynced).abs().max().item()
    print(f"[families] sync {family} (float64, returned in float32; euler/simple, 2 steps): max |pack - paper's loop| = "
          f"{error:.2e} (relative {error / ref.abs().max().item():.1e}); sync moved the result by {moved:.3e}")
    # float64 throughout; ComfyUI returns the latent in float32: equal up to that last rounding
    ulp = 2 ** -23 * ref.abs().max().item()
    assert error <= ulp
    assert moved > 1000 * ulp  # the comparison is not vacuous


class Recorder:
    """Below the pack's wrapper: the latents each window is evaluated at (gradient passes, then the denoising pass)."""

    def __init__(self):
        self.calls = []

    def __call__(self, executor, model, conds, x, timestep, *args, **kwargs):
        self.calls.append((x.detach().clone(), x.requires_grad, float(timestep[0])))
        return executor(model, conds, x, timestep, *args, **kwargs)


@pytest.mark.parametrize("family", SYNC_FAMILIES)
def test_sync_gradient_matches_finite_differences_in_float64(f, family):
    """The pack's update of a window, read below its wrapper and divided by w (alpha^2 + sigma^2), against
    central differences of the loss written out in the test (float64 models, VAE and LPIPS)."""
    ours, plain = world64(f, family)
    weight, recorder = 0.5, Recorder()
    windowed = f.bridge.windowed_model(ours["model"], f.plan, 1, sync_settings(f, ours, weight=weight, decay=1.0))
    windowed.add_wrapper_with_key(f.pe.WrappersMP.CALC_COND_BATCH, "test.recorder", recorder)
    with torch.inference_mode(), plain_torch_kernels():
        f.nodes.common_ksampler(windowed, 5, 1, ours["cfg"], "euler", "simple", ours["pos"], ours["neg"], ours["latent"])
    calls = recorder.calls
    graded = [i for i, c in enumerate(calls) if c[1]]
    assert not calls[0][1] and len(graded) == WINDOWS - 1  # anchor without graph, every other window with one
    # the denoising pass reuses the anchor's recorded prediction: it evaluates windows 1.. at their moved latents
    assert len(calls) == 1 + 2 * (WINDOWS - 1)
    moved = [None] + [c[0] for c in calls[graded[-1] + 1:]]
    sigma = torch.tensor(calls[0][2], dtype=torch.float64)
    ref = Reference(f, plain)
    with plain_torch_kernels():
        worst, exact = _gradient_errors(ref, calls, graded, moved, sigma, weight, family)
    print(f"[families] sync {family}: the pack's gradient vs autograd of the loss written here: relative {exact:.1e}; "
          f"vs central differences (eps 1e-3; the gradient's direction and 2 random ones): worst error {worst:.1e} "
          f"of |grad| (sigma {float(sigma):.4g}, step scale {paper_step_scale(family, sigma):.4g})")
    assert exact < 1e-10  # the same gradient as autograd through the loss written out here
    # float64 end to end except that ComfyUI's BaseModel hands the network's output back in float32 (`.float()`
    # in _apply_model): the loss carries float32 rounding, which central differences divide by eps
    assert worst < 5e-3


def _gradient_errors(ref, calls, graded, moved, sigma, weight, family):
    """(worst central-difference error, read-back vs autograd error) of the pack's update of window 2."""
    with torch.no_grad():
        anchor_image = ref.image(ref.denoise(calls[0][0], sigma, 0))
    window = 2
    x = calls[graded[window - 1]][0]
    grad_pack = (x - moved[window]) / (weight * paper_step_scale(family, sigma))
    assert grad_pack.abs().max() > 0
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        (grad_ref,) = torch.autograd.grad(ref.loss(xg, sigma, window, anchor_image), xg)
    exact = ((grad_pack - grad_ref).abs().max() / grad_ref.abs().max()).item()
    # directions: the gradient's own and two random ones, unit length; the error is relative to the gradient's
    # norm (the largest directional derivative), so directions where the derivative is near 0 stay well-posed
    g, eps, worst = torch.Generator().manual_seed(0), 1e-3, 0.0
    norm = grad_pack.norm()
    for v in [grad_pack / norm] + [torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(2)]:
        v = v / v.norm()
        with torch.no_grad():
            fd = (ref.loss(x + eps * v, sigma, window, anchor_image) - ref.loss(x - eps * v, sigma, window, anchor_image)) / (2 * eps)
        worst = max(worst, abs(float(fd) - float((grad_pack * v).sum())) / float(norm))
    return worst, exact


FAMILIES = SYNC_FAMILIES


def window_lpips_to_anchor(f, w, latent):
    loss = f.bridge.load_lpips("alex", "cpu")
    with torch.inference_mode():
        images = w["vae"].decode(latent)
        images = images.reshape(-1, *images.shape[-3:]).movedim(-1, 1) * 2 - 1  # video VAEs: (batch, frames, ...)
        crops = [images[..., s * STRIDE_PX:s * STRIDE_PX + WINDOW_PX] for s in range(WINDOWS)]
        return [float(loss(c, crops[0])) for c in crops[1:]]


@pytest.mark.parametrize("family", FAMILIES)
def test_anchor_sync_lowers_the_windows_lpips_to_the_anchor(f, family):
    w = world(f, family)
    before = window_lpips_to_anchor(f, w, sample(f, w, steps=4))
    after = window_lpips_to_anchor(f, w, sample(f, w, sync=sync_settings(f, w, weight=200.0, decay=1.0), steps=4))
    print(f"[families] {family}: LPIPS to the anchor per window without sync {[round(v, 4) for v in before]}, "
          f"with AnchorSync {[round(v, 4) for v in after]} (seed 5, 4 steps, w 200)")
    assert sum(after) < sum(before)


class RolledNoise:
    """Seeded noise rolled along the width (SamplerCustomAdvanced's NOISE interface)."""

    def __init__(self, seed, shift):
        self.seed, self.shift = seed, shift

    def generate_noise(self, latent):
        import comfy.sample
        samples = latent["samples"]
        return comfy.sample.prepare_noise(samples, self.seed, None).roll(self.shift, dims=-1)


@pytest.mark.parametrize("family,control", [("sdxl", "controlnet"), ("sd35", "sd35"), ("flux", "instantx"),
                                            ("flux", "concat"), ("qwen", "qwen"), ("flux2", "none"),
                                            ("flux2_klein", "reference"), ("zimage", "none"), ("qwen_edit", "reference"),
                                            ("chroma", "none"), ("hidream", "none")])
def test_factor_graph_loop_has_no_seam(f, family, control):
    """A cycle treats its wrap like any other overlap: rolling the noise and the condition by one factor step
    rolls the result (so no place, the wrap included, is special). Flux Tools' condition latent and an edit
    model's reference latent are encoded once for the canvas, so it is the latent that is rolled (a rolled image
    would be encoded with its border elsewhere)."""
    import node_helpers
    import comfy_extras.nodes_custom_sampler as cs
    from comfy_extras.nodes_edit_model import ReferenceLatent
    from comfy_extras.nodes_ip2p import InstructPixToPixConditioning
    w = world(f, family, control)
    plan = f.Collage.execute("cycle", 192, 64, 64, 64, 32, "horizontal", 0).args[0]
    step = 32 // cell(family)  # cells: window - overlap
    results = []
    for shift in (0, step):
        image = f.image.roll(shift * cell(family), dims=2)
        with torch.inference_mode():
            if control == "concat":
                pos, neg, _ = InstructPixToPixConditioning.execute(w["pos_text"], w["neg_text"], f.image, w["vae"]).args
                rolled = pos[0][1]["concat_latent_image"].roll(shift, dims=-1)
                pos, neg = (node_helpers.conditioning_set_values(c, {"concat_latent_image": rolled}) for c in (pos, neg))
            elif control == "reference":
                rolled = {"samples": w["reference"].roll(shift, dims=-1)}
                pos, neg = (ReferenceLatent.execute(c, rolled).args[0] for c in (w["pos_text"], w["neg_text"]))
            elif control == "none":
                pos, neg = w["pos_text"], w["neg_text"]
            else:
                pos, neg = f.nodes.ControlNetApplyAdvanced().apply_controlnet(w["pos_text"], w["neg_text"], w["control"],
                                                                              image, 1.0, 0.0, 1.0, vae=w["vae"])
            model = f.Windowed.execute(w["model"], plan, 1).args[0]
            guider = cs.CFGGuider().get_guider(model, pos, neg, w["cfg"])[0]
            sigmas = cs.BasicScheduler().get_sigmas(model, "simple", 3, 1.0)[0]
            out = cs.SamplerCustomAdvanced().sample(RolledNoise(7, shift), guider, cs.KSamplerSelect().get_sampler("euler")[0],
                                                    sigmas, w["latent"])[0]["samples"]
        results.append(out)
    error = (results[1] - results[0].roll(step, dims=-1)).abs().max().item()
    print(f"[families] {family}/{control}: loop rolled by one factor step: max deviation from the rolled result {error:.1e}")
    assert error <= 1e-5 * results[0].abs().max().item()
    from controlsync.nodes.loop_decode import LoopDecode
    with torch.inference_mode():  # the family's VAE decodes the loop across its wrap (Qwen-Image: a one-frame latent)
        looped = LoopDecode.execute({"samples": results[0]}, w["vae"], 4).args[0]
    assert looped.shape == (1, *CANVAS_PX, 3) and bool(torch.isfinite(looped).all())


# --- SDXL's size conditioning per window ---------------------------------------------------------

def sdxl_size_vector(pooled, height, width, crop_h, crop_w, target_h, target_w):
    """SDXL's `y`: the pooled CLIP-G embedding followed by 256-dim Fourier features (cos, then sin, at
    frequencies 10000^(-k/128)) of original height, width, crop top, left, target height, width."""
    k = torch.arange(128, dtype=torch.float64)
    freqs = torch.exp(-math.log(10000.0) * k / 128)
    feats = []
    for v in (height, width, crop_h, crop_w, target_h, target_w):
        args = v * freqs
        feats.append(torch.cat([torch.cos(args), torch.sin(args)]))
    return torch.cat([pooled.double().flatten(), torch.cat(feats)])


def test_sdxl_windows_are_conditioned_as_crops_of_the_canvas(f):
    """Hook on the real UNet: each window's `y` says original size = the canvas, crop = the window's offset,
    target = the window's size (SDXL's training-time meaning of a crop), computed here from SDXL's formula;
    a loop (no edge to measure from) gives every window crop (0, 0); the prompt's own sizes are kept."""
    import node_helpers
    w = world(f, "sdxl")
    unet = w["model"].model.diffusion_model
    pooled = w["pos_text"][0][1]["pooled_output"]

    def ys(plan, pos=None):
        calls = []
        handle = unet.register_forward_hook(lambda m, a, kw, out: calls.append(kw["y"].clone()), with_kwargs=True)
        try:
            sample(f, w, plan=plan, steps=1, batch=1, pos=pos)
        finally:
            handle.remove()
        return [y[-1] for y in calls]  # cond and uncond batch as [uncond, cond]: the positive is last

    for got, start in zip(ys(f.plan), starts("sdxl")):
        assert torch.allclose(got.double(), sdxl_size_vector(pooled, 64, 192, 0, start * 8, 64, 64), atol=1e-4)  # float32 sin/cos in ComfyUI
    loop = f.Collage.execute("cycle", 192, 64, 64, 64, 32, "horizontal", 0).args[0]
    layout = f.bridge.layout_for(loop, w["model"], w["latent"]["samples"].shape)
    sizes = list(dict.fromkeys(r.size for r in layout.regions))  # the sampler batches regions by size
    called = [r for size in sizes for r in layout.regions if r.size == size]
    assert any(len(r.pieces) > 1 for r in called)  # some factor crosses the wrap
    got_loop = ys(loop)
    assert len(got_loop) == len(called) == 12  # 6 factors, 6 overlaps
    for got, region in zip(got_loop, called):
        h, w_ = region.size
        assert torch.allclose(got.double(), sdxl_size_vector(pooled, 64, 192, 0, 0, h * 8, w_ * 8), atol=1e-4)
    # CLIPTextEncodeSDXL's sizes (here: a 4096 px original, a crop, a 1024 px target) are the prompt's: kept,
    # the window's offset added to the crop
    pos = node_helpers.conditioning_set_values(w["pos"], {"width": 4096, "height": 2048, "crop_w": 16, "crop_h": 8,
                                                          "target_width": 1024, "target_height": 1024})
    for got, start in zip(ys(f.plan, pos), starts("sdxl")):
        assert torch.allclose(got.double(), sdxl_size_vector(pooled, 2048, 4096, 8, 16 + start * 8, 1024, 1024), atol=1e-3)  # arguments up to 4096


# --- per-factor prompts for every family's text conditioning ---------------------------------------

def factor_entries(f, family, lengths):
    """CONDITIONING with one entry per factor, as CLIP Text Encode nodes joined by Conditioning (Combine) give it."""
    out = []
    for k, tokens in enumerate(lengths):
        out += f.tf.text_cond(family, 30 + k, tokens=tokens)
    return out


def model_text(family, text):
    """The text embedding as the family's model takes a prompt: Flux.2 pads every prompt to 512 tokens on the left
    (model_base.Flux2.extra_conds)."""
    if family.startswith("flux2"):
        return torch.nn.functional.pad(text, (0, 0, 512 - text.shape[-2], 0))
    return text


@pytest.mark.parametrize("family", ["sdxl", "sd35", "flux", "qwen", "flux2", "flux2_klein", "zimage", "chroma"])
def test_per_factor_prompts_reach_their_factors_with_their_pooled_embeddings(f, family):
    """Hook on the real diffusion model: each factor is denoised with its own text embedding (as the model takes a
    prompt) and, where the family has one (SDXL: CLIP-G in `y`; SD3: CLIP-L + CLIP-G; Flux: CLIP-L), its own
    pooled embedding; each overlap with the mean of its factors' (variable_prompts 'mean')."""
    w = world(f, family)
    entries = factor_entries(f, family, [12, 12, 12])
    plan = f.Collage.execute("chain", 128, 64, 64, 64, 32, "horizontal", 0, prompt_mode="per factor",
                             factor_conditioning=entries).args[0]
    hw = latent_hw(family, (64, 128))
    layout = f.bridge.layout_for(plan, w["model"], (1, 16) + hw)
    net, calls = w["model"].model.diffusion_model, []
    handle = net.register_forward_hook(lambda m, a, kw, out: calls.append((kw["context"][-1].clone(),
                                                                            kw.get("y", torch.zeros(1, 1))[-1].clone())),
                                       with_kwargs=True)
    channels = w["latent"]["samples"].shape[1]
    try:
        sample(f, dict(w, latent={"samples": torch.zeros(1, channels, *hw)}), plan=plan, pos=w["pos_text"],
               neg=w["neg_text"], steps=1, batch=1)
    finally:
        handle.remove()
    assert len(calls) == len(layout.regions) == 5  # 3 factors, 2 overlaps
    sizes = list(dict.fromkeys(r.size for r in layout.regions))
    order = [i for size in sizes for i, r in enumerate(layout.regions) if r.size == size]
    for (context, y), i in zip(calls, order):
        sources = layout.factors_of[i]
        text = model_text(family, torch.stack([entries[s][0] for s in sources]).mean(0))[0]
        assert context.shape == text.shape and torch.allclose(context, text, atol=1e-6), (family, i)
        pooled = entries[0][1].get("pooled_output")
        if pooled is not None:
            expected = torch.stack([entries[s][1]["pooled_output"][0] for s in sources]).mean(0)
            assert torch.allclose(y[:expected.shape[-1]], expected, atol=1e-6), (family, i)
            assert not torch.allclose(y[:expected.shape[-1]], w["pos_text"][0][1]["pooled_output"][0])


def test_per_factor_prompts_are_refused_where_the_prompt_carries_more_than_a_plan_holds(f):
    """HiDream's prompt also carries Llama-3 hidden states per block: a plan holds a text embedding and a pooled
    vector per factor, so per-factor prompts on HiDream are refused at the sampler, naming the setting."""
    w = world(f, "hidream")
    plan = f.Collage.execute("chain", 128, 64, 64, 64, 32, "horizontal", 0, prompt_mode="per factor",
                             factor_conditioning=factor_entries(f, "hidream", [12, 12, 12])).args[0]
    with pytest.raises(ValueError, match=r"plan: per-factor prompts .* \(HiDream\) also carries Llama-3 hidden states"
                                         r".* prompt_mode 'one for all'"):
        sample(f, dict(w, latent={"samples": torch.zeros(1, 16, 8, 16)}), plan=plan, steps=1, batch=1)


def test_text_encoders_without_77_token_chunks_interpolate_only_prompts_of_equal_length(f):
    """T5 and Qwen's encoder give one token per word piece: embeddings of different lengths cannot be averaged
    or interpolated token by token (refused at the node, naming the input); 'per factor' prompts of different
    lengths with null overlaps sample, each length batched on its own; equal lengths interpolate (Flux's T5
    pads short prompts to 77 tokens)."""
    w = world(f, "qwen")
    uneven = factor_entries(f, "qwen", [12, 15])
    with pytest.raises(ValueError, match=r"prompts: 'interpolate': .* these encode to 12, 15 tokens .* 'per factor'"):
        f.Collage.execute("chain", 128, 64, 64, 64, 32, "horizontal", 0, prompt_mode="interpolate",
                          factor_conditioning=uneven)
    three = factor_entries(f, "qwen", [12, 15, 12])
    with pytest.raises(ValueError, match=r"variable_prompts 'mean': .* 12, 15 tokens"):
        f.Collage.execute("chain", 128, 64, 64, 64, 32, "horizontal", 0, prompt_mode="per factor",
                          factor_conditioning=three)
    from controlsync.sampling.collage import FactorGraphPlan
    null = f.tf.text_cond("qwen", 40, tokens=9)[0][0]
    null_plan = FactorGraphPlan("chain", (64, 128), (64, 64), 32, factor_prompts=tuple(e[0] for e in three),
                                variable_prompt="null", null_prompt=null)
    latent = {"samples": torch.zeros(1, 16, 8, 16)}
    out = sample(f, dict(w, latent=latent), plan=null_plan, pos=w["pos_text"], neg=w["neg_text"], steps=2, batch=4)
    assert bool(torch.isfinite(out).all())
    flux = f.Collage.execute("chain", 128, 64, 64, 64, 32, "horizontal", 0, prompt_mode="interpolate",
                             factor_conditioning=factor_entries(f, "flux", [77, 77])).args[0]
    assert len(flux.factor_prompts) == len(flux.factor_pooled) == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_sync_modes_run_in_every_family(f, family):
    """AnchorSync's fast mode (the model's Jacobian skipped) and half-resolution loss run and move the result."""
    w = world(f, family)
    unsynced, exact = sample(f, w, steps=2), sample(f, w, sync=sync_settings(f, w, weight=200.0), steps=2)
    with torch.inference_mode():
        fast_settings = f.Sync.execute(w["vae"], 200.0, 0.95, 50, "alex", "skip model Jacobian", "half").args[0]
    fast = sample(f, w, sync=fast_settings, steps=2)
    assert bool(torch.isfinite(fast).all())
    import comfy.model_management
    assert getattr(comfy.model_management, "in_training", False) is False  # set for the gradient passes only
    assert not torch.equal(fast, unsynced) and not torch.equal(fast, exact) and not torch.equal(exact, unsynced)


@pytest.mark.parametrize("family", FAMILIES)
def test_cubemap_samples_and_decodes_in_every_family(f, family):
    """A 360 cubemap (three 4-face loops, windows across cube edges turned) with the family's ControlNet crops,
    decoded face by face inside its cube neighbours (edit models: text only, the reference describes another
    canvas)."""
    from controlsync.nodes.equirect_to_cubemap import EquirectToCubemap
    from controlsync.nodes.loop_decode import LoopDecode
    w = world(f, family)
    strip = EquirectToCubemap.execute(f.tm.condition_image(128, 256), 64).args[0]
    plan = f.Collage.execute("cubemap", 64, 64, 64, 64, 32, "horizontal", 0, image=strip).args[0]
    channels = w["latent"]["samples"].shape[1]
    with torch.inference_mode():
        if w["kind"] == "concat":
            pos, neg = w["pos"], w["neg"]
        elif w["kind"] in ("none", "reference"):
            pos, neg = w["pos_text"], w["neg_text"]
        else:
            pos, neg = f.nodes.ControlNetApplyAdvanced().apply_controlnet(w["pos_text"], w["neg_text"], w["control"],
                                                                          strip, 1.0, 0.0, 1.0, vae=w["vae"])
    latent = {"samples": torch.zeros(1, channels, *latent_hw(family, (64, 384)))}
    out = sample(f, dict(w, latent=latent), plan=plan, pos=pos, neg=neg, steps=1)
    with torch.inference_mode():
        cube = LoopDecode.execute({"samples": out}, w["vae"], 4, "cubemap").args[0]
    assert cube.shape == (1, 64, 384, 3) and bool(torch.isfinite(cube).all())
