"""FactorGraphCollage plans sampled by ControlSyncSampler inside a real ComfyUI."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def c(comfy):
    import nodes
    import tiny_models as tm
    from controlsync.nodes.controlsync_sampler import ControlSyncSampler
    from controlsync.nodes.factor_graph_collage import FactorGraphCollage
    from controlsync.nodes.window_planner import WindowPlanner
    from controlsync.nodes.windowed_model import ControlSyncWindowedModel

    class C:
        pass
    c = C()
    c.nodes, c.tm = nodes, tm
    c.Collage, c.Planner, c.Sampler, c.Windowed = FactorGraphCollage, WindowPlanner, ControlSyncSampler, ControlSyncWindowedModel
    with torch.inference_mode():
        c.model, c.cn = tm.tiny_model(0), tm.tiny_controlnet(1)
    c.image = tm.condition_image(64, 256)
    return c


def conds(c, image):
    with torch.inference_mode():
        return c.nodes.ControlNetApplyAdvanced().apply_controlnet(c.tm.text_cond(10), c.tm.text_cond(11), c.cn, image,
                                                                  0.9, 0.0, 1.0)


def sample(c, plan, image, latent=None, sampler="euler", steps=3, seed=7):
    pos, neg = conds(c, image)
    latent = latent or {"samples": torch.zeros(1, 4, image.shape[1] // 8, image.shape[2] // 8)}
    with torch.inference_mode():
        return c.Sampler.execute(c.model, seed, steps, 7.5, sampler, "normal", pos, neg, latent, plan, 1.0, 0).args[0]["samples"]


def collage(c, graph, image, window=64, overlap=32, **kw):
    return c.Collage.execute(graph, 2048, 512, window, 64, overlap, kw.get("direction", "horizontal"), 0,
                             image=image).args[0]


def test_one_factor_graph_equals_one_window_plan_equals_ksampler(c):
    image = c.image[:, :, :64]
    one_factor = collage(c, "chain", image, window=64, overlap=0)
    one_corner_factor = c.Collage.execute("corner_grid", 64, 64, 64, 64, 32, "horizontal", 0, image=image).args[0]
    one_window = c.Planner.execute(64, 64, 64, 64, 64, "first", 0, "uniform", image=image).args[0]
    a, b = sample(c, one_factor, image), sample(c, one_window, image)
    assert torch.equal(sample(c, one_corner_factor, image), a)
    pos, neg = conds(c, image)
    with torch.inference_mode():
        ref = c.nodes.common_ksampler(c.model, 7, 3, 7.5, "euler", "normal", pos, neg,
                                      {"samples": torch.zeros(1, 4, 8, 8)})[0]["samples"]
    assert torch.equal(a, b) and torch.equal(a, ref)


def window_crop(canvas, y, x, h, w):
    """Cells y..y+h, x..x+w of a (..., H, W) canvas, the columns wrapping around (loops)."""
    cols = torch.tensor([(x + i) % canvas.shape[-1] for i in range(w)])
    return canvas[..., y:y + h, :].index_select(-1, cols)


def recorded_hints(c, plan, image):
    """Every hint the real ControlNet module receives in a 1-step run, one per batch item."""
    hints = []
    handle = c.cn.control_model.register_forward_hook(lambda m, a, kw, out: hints.append(kw["hint"].clone()),
                                                      with_kwargs=True)
    try:
        out = sample(c, plan, image, steps=1)
    finally:
        handle.remove()
    assert bool(torch.isfinite(out).all()) and out.shape[-2:] == (image.shape[1] // 8, image.shape[2] // 8)
    return [h for hint in hints for h in hint]


@pytest.mark.parametrize("graph", ["chain", "cycle", "grid", "corner_grid"])
def test_graphs_give_every_region_its_controlnet_crop(c, graph):
    """A forward hook on the real ControlNet module: every factor and overlap (a loop's across the wrap too)
    gets the crop of ComfyUI's canvas-sized hint at its cells, cut out here, and nothing else."""
    import comfy.utils
    image = c.image if graph in ("chain", "cycle") else c.tm.condition_image(128, 128)
    if graph in ("chain", "cycle"):
        plan = collage(c, graph, image)
    else:
        plan = c.Collage.execute(graph, 128, 128, 64, 64, 32, "horizontal", 0, image=image).args[0]
    layout = plan.layout((image.shape[1] // 8, image.shape[2] // 8), 8)
    hints = recorded_hints(c, plan, image)
    H, W = image.shape[1:3]
    canvas_hint = comfy.utils.common_upscale(image.movedim(-1, 1), W, H, c.cn.upscale_algorithm, "center")[0]
    expected = []
    for region in layout.regions:
        (y, x), (h, w) = region.pieces[0].src, region.size
        expected.append(window_crop(canvas_hint, 8 * y, 8 * x, 8 * h, 8 * w))
    if graph == "cycle":
        assert any(len(r.pieces) > 1 for r in layout.regions)  # some regions cross the wrap
    assert len(hints) >= len(expected)
    for hint in hints:
        assert any(hint.shape == e.shape and torch.equal(hint, e.to(hint.dtype)) for e in expected)
    for e in expected:
        assert any(hint.shape == e.shape and torch.equal(hint, e.to(hint.dtype)) for hint in hints)


def _record(log):
    def wrapper(executor, model, conds, x, timestep, *args, **kwargs):
        out = executor(model, conds, x, timestep, *args, **kwargs)
        log.append((x.clone(), [o.clone() for o in out]))
        return out
    return wrapper


def test_corner_grid_merge_is_the_papers_sum(c):
    """The paper's grid in ControlSync Sampler: the canvas prediction ComfyUI's CFG receives (recorded above the
    windowed model) is sum(factors) - sum(corner quarters) of the predictions each region's model call returned
    (recorded below it), with the graph written out here by hand: 128x192 px, 64 px factors."""
    import comfy.patcher_extension as pe
    image = c.tm.condition_image(128, 192)
    plan = c.Collage.execute("corner_grid", 192, 128, 64, 64, 32, "horizontal", 0, image=image).args[0]
    # latent cells: a 2x3 tiling of 8-cell factors, 2 more 4 cells in, and the 8 corners where they meet
    tiling = [(y, x, 8, 8) for y in (0, 8) for x in (0, 8, 16)]
    shifted = [(4, 4, 8, 8), (4, 12, 8, 8)]
    corners = [(y, x, 4, 4) for y in (4, 8) for x in (4, 8, 12, 16)]
    expected_regions = [(r, 1.0) for r in tiling + shifted] + [(r, -1.0) for r in corners]
    outer, inner = [], []
    base = c.model.clone()
    base.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "test.outer", _record(outer))
    model = c.Windowed.execute(base, plan, 1).args[0]
    model.add_wrapper_with_key(pe.WrappersMP.CALC_COND_BATCH, "test.inner", _record(inner))
    pos, neg = conds(c, image)
    with torch.inference_mode():
        c.nodes.common_ksampler(model, 7, 1, 7.5, "euler", "normal", pos, neg, {"samples": torch.zeros(1, 4, 16, 24)})
    (x_canvas, merged), = outer
    B = x_canvas.shape[0]
    predictions = {}  # (y, x, h, w) -> per cond, the region's prediction
    for x_call, outs in inner:
        for k in range(x_call.shape[0] // B):
            part = x_call[k * B:(k + 1) * B]
            found = [r for r, _ in expected_regions if r[2:] == tuple(part.shape[-2:]) and
                     torch.equal(part, x_canvas[..., r[0]:r[0] + r[2], r[1]:r[1] + r[3]])]
            assert len(found) == 1
            predictions[found[0]] = [o[k * B:(k + 1) * B] for o in outs]
    assert set(predictions) == {r for r, _ in expected_regions}
    for ci in range(len(merged)):
        total = torch.zeros_like(merged[ci], dtype=torch.float64)
        weight = torch.zeros(16, 24, dtype=torch.float64)
        for (y, x, h, w), coefficient in expected_regions:
            total[..., y:y + h, x:x + w] += coefficient * predictions[(y, x, h, w)][ci].double()
            weight[y:y + h, x:x + w] += coefficient
        assert torch.equal(weight, torch.ones_like(weight))
        assert torch.allclose(merged[ci].double(), total, atol=1e-5)


class RolledNoise:
    """A NOISE for SamplerCustomAdvanced: the seed's noise rolled along the width."""

    def __init__(self, seed, shift):
        self.seed, self.shift = seed, shift

    def generate_noise(self, latent):
        import comfy.sample
        return comfy.sample.prepare_noise(latent["samples"], self.seed).roll(self.shift, dims=-1)


def test_cycle_is_shift_equivariant(c):
    """Rolling the noise and the condition by a multiple of the factor stride rolls the result."""
    import comfy_extras.nodes_custom_sampler as cs
    stride_cells = (64 - 32) // 8
    plan = collage(c, "cycle", c.image)
    results = []
    for shift in (0, stride_cells, 3 * stride_cells):
        image = c.image.roll(shift * 8, dims=2)
        pos, neg = conds(c, image)
        with torch.inference_mode():
            model = c.Windowed.execute(c.model, plan, 1).args[0]
            guider = cs.CFGGuider().get_guider(model, pos, neg, 7.5)[0]
            sigmas = cs.BasicScheduler().get_sigmas(model, "normal", 3, 1.0)[0]
            sampler = cs.KSamplerSelect().get_sampler("euler")[0]
            out = cs.SamplerCustomAdvanced().sample(RolledNoise(7, shift), guider, sampler, sigmas,
                                                    {"samples": torch.zeros(1, 4, 8, 32)})[0]["samples"]
        results.append((shift, out))
    base = results[0][1]
    for shift, out in results[1:]:
        err = (out - base.roll(shift, dims=-1)).abs().max().item()
        print(f"[collage] cycle rolled by {shift} cells: max deviation from the rolled result {err:.1e}")
        assert err <= 1e-5 * base.abs().max().item()
    # a chain (no wrap) is not: its ends differ from the middle
    chain = collage(c, "chain", c.image)
    assert not torch.allclose(sample(c, chain, c.image), sample(c, chain, c.image.roll(32, dims=2)).roll(-4, dims=-1),
                              atol=1e-3)


def test_bad_graph_inputs_name_the_input(c):
    with pytest.raises(ValueError, match="FactorGraphCollage: .*larger than the canvas"):
        c.Collage.execute("chain", 256, 64, 512, 64, 32, "horizontal", 0)
    with pytest.raises(ValueError, match="FactorGraphCollage: overlap = 64 px must be smaller"):
        c.Collage.execute("chain", 256, 64, 64, 64, 64, "horizontal", 0)
    with pytest.raises(ValueError, match="multiple of window - overlap"):
        c.Collage.execute("cycle", 264, 64, 64, 64, 32, "horizontal", 0)
    with pytest.raises(ValueError, match="anchor 9 is past the last factor"):
        c.Collage.execute("chain", 256, 64, 64, 64, 32, "horizontal", 9)


class PromptRecorder:
    """Below our wrapper: the positive text embedding each region's model call gets."""

    def __init__(self):
        self.calls = []

    def __call__(self, executor, model, conds, x, timestep, *args, **kwargs):
        self.calls.append((tuple(x.shape[-2:]), conds[0][0]["model_conds"]["c_crossattn"].cond.clone()))
        return executor(model, conds, x, timestep, *args, **kwargs)


@pytest.mark.parametrize("variables", ["mean", "null"])
def test_per_factor_prompts_reach_their_factors(c, variables):
    import comfy.patcher_extension
    from controlsync.sampling.collage import FactorGraphPlan as PackPlan
    g = torch.Generator().manual_seed(3)
    prompts = tuple(torch.randn(1, 77, c.tm.CONTEXT_DIM, generator=g) for _ in range(3))
    null = torch.zeros(1, 77, c.tm.CONTEXT_DIM)
    image = c.image[:, :, :128]
    plan = PackPlan("chain", (64, 128), (64, 64), 32, factor_prompts=prompts, variable_prompt=variables, null_prompt=null)
    layout = plan.layout((8, 16), 8)
    recorder = PromptRecorder()
    model = c.Windowed.execute(c.model, plan, 1).args[0]
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "test.prompts", recorder)
    pos, neg = conds(c, image)
    with torch.inference_mode():
        out = c.nodes.common_ksampler(model, 7, 1, 7.5, "euler", "normal", pos, neg,
                                      {"samples": torch.zeros(1, 4, 8, 16)})[0]["samples"]
    assert bool(torch.isfinite(out).all())
    assert len(recorder.calls) == len(layout.regions) == 5  # 3 factors, 2 overlaps
    for (shape, got), region, sources in zip(recorder.calls, layout.regions, layout.factors_of):
        assert shape == region.size
        expected = prompts[sources[0]] if len(sources) == 1 else (
            null if variables == "null" else (prompts[sources[0]] + prompts[sources[1]]) / 2)
        assert torch.allclose(got, expected, atol=1e-6)


def test_prompt_modes_encode_with_a_real_clip(c):
    """The node's own encoding, with the full-size CLIP-L of the end-to-end checkpoint."""
    import comfy.sd
    import e2e_assets
    from comfy_host import find_host
    assets = e2e_assets.ensure_assets(find_host())
    with torch.inference_mode():
        _, clip, _ = comfy.sd.load_checkpoint_guess_config(str(assets.checkpoint), output_vae=False, output_clip=True)[:3]
        lines = "a city at dawn\na forest\na desert at dusk"
        plan = c.Collage.execute("chain", 256, 64, 128, 64, 64, "horizontal", 0, "per factor", lines, "null", clip).args[0]
        for line, emb in zip(lines.splitlines(), plan.factor_prompts):
            assert torch.equal(emb, clip.encode_from_tokens(clip.tokenize(line)))
        assert torch.equal(plan.null_prompt, clip.encode_from_tokens(clip.tokenize("")))
        interp = c.Collage.execute("chain", 256, 64, 128, 64, 64, "horizontal", 0, "interpolate",
                                   "a city at dawn\na desert at dusk", "mean", clip).args[0]
        assert torch.equal(interp.factor_prompts[0], plan.factor_prompts[0])
        assert torch.equal(interp.factor_prompts[-1], plan.factor_prompts[-1])
        assert not torch.equal(interp.factor_prompts[1], plan.factor_prompts[1])
        with pytest.raises(ValueError, match="prompts: prompt_mode 'per factor' needs one line per factor: the graph has 3"):
            c.Collage.execute("chain", 256, 64, 128, 64, 64, "horizontal", 0, "per factor", "one\ntwo", "mean", clip)
        with pytest.raises(ValueError, match="clip: prompt_mode 'per factor'"):
            c.Collage.execute("chain", 256, 64, 128, 64, 64, "horizontal", 0, "per factor", lines, "mean", None)
        # the same prompts as CONDITIONING: CLIP Text Encode nodes joined by Conditioning (Combine), in order
        encoded = [c.nodes.CLIPTextEncode().encode(clip, line)[0] for line in lines.splitlines()]
        combined = c.nodes.ConditioningCombine().combine(c.nodes.ConditioningCombine().combine(encoded[0], encoded[1])[0],
                                                         encoded[2])[0]
        as_cond = c.Collage.execute("chain", 256, 64, 128, 64, 64, "horizontal", 0, "per factor", "", "null", clip,
                                    factor_conditioning=combined).args[0]
        assert all(torch.equal(a, b) for a, b in zip(as_cond.factor_prompts, plan.factor_prompts))
        assert len(as_cond.factor_prompts) == 3 and torch.equal(as_cond.null_prompt, plan.null_prompt)
        with pytest.raises(ValueError, match="factor_conditioning: prompt_mode 'per factor' needs one entry per factor: "
                                             "the graph has 3 but factor_conditioning has 2 entries"):
            c.Collage.execute("chain", 256, 64, 128, 64, 64, "horizontal", 0, "per factor", "", "mean", None,
                              factor_conditioning=encoded[0] + encoded[1])
        with pytest.raises(ValueError, match="not both"):
            c.Collage.execute("chain", 256, 64, 128, 64, 64, "horizontal", 0, "per factor", lines, "mean", None,
                              factor_conditioning=combined)


def seam_ratio(image):
    """The pack's seam score of an IMAGE (1, H, W, 3): 1.0 = the wrap is as smooth as the interior."""
    from controlsync.sampling.metrics import seam_score
    return seam_score(image[0].movedim(-1, 0) * 2 - 1)


def test_loop_decode_keeps_the_wrap_as_smooth_as_the_interior(c):
    from controlsync.nodes.loop_decode import LoopDecode
    with torch.inference_mode():
        vae = c.tm.tiny_vae()
        plan = collage(c, "cycle", c.image)
        latent = {"samples": sample(c, plan, c.image, steps=4)}
        looped = LoopDecode.execute(latent, vae, 8).args[0]
        plain = vae.decode(latent["samples"])
    assert looped.shape == plain.shape == (1, 64, 256, 3)
    ratios = (seam_ratio(looped), seam_ratio(plain))
    print(f"[collage] seam score (wrap / interior column difference): loop decode {ratios[0]:.2f}, plain decode {ratios[1]:.2f}")
    assert ratios[0] < 1.5 and ratios[0] < ratios[1]
    with pytest.raises(ValueError, match="wrap_cells: 99 is wider than the latent"):
        LoopDecode.execute(latent, vae, 99)


def test_replacement_outpainting_keeps_the_known_cells(c):
    """Outpainting on a collage: ComfyUI's noise mask replaces the x0-prediction (and x_t) by the known latent
    every step - DiffCollage's Replacement - inside every factor and overlap."""
    g = torch.Generator().manual_seed(5)
    known = torch.randn(1, 4, 8, 32, generator=g)
    mask = torch.ones(1, 64, 256)
    mask[:, :, 96:160] = 0.0  # a photo in the middle, to be extended left and right
    latent = {"samples": known, "noise_mask": mask}
    out = sample(c, collage(c, "chain", c.image), c.image, latent=latent, steps=4)
    assert torch.allclose(out[..., 12:20], known[..., 12:20], rtol=0, atol=1e-5)
    assert (out[..., :10] - known[..., :10]).abs().mean() > 0.1


# --- 360 cubemap ------------------------------------------------------------------------------

def cube_strip(c, face_px=64):
    """A condition strip made from an equirectangular picture, as a user's graph would."""
    from controlsync.nodes.equirect_to_cubemap import EquirectToCubemap
    return EquirectToCubemap.execute(c.tm.condition_image(2 * face_px, 4 * face_px), face_px).args[0]


def test_cubemap_hint_reaching_each_region_is_the_turned_crop_of_the_canvas_hint(c):
    """Every region (windows across faces, turned quarter by quarter) gets ComfyUI's canvas-sized hint
    gathered exactly as its latent is."""
    import comfy.utils
    from controlsync.sampling import gather
    strip = cube_strip(c)
    plan = c.Collage.execute("cubemap", 64, 64, 64, 64, 32, "horizontal", 0, image=strip).args[0]
    layout = plan.layout((8, 48), 8)
    hints = []
    handle = c.cn.control_model.register_forward_hook(lambda m, a, kw, out: hints.append(kw["hint"].clone()),
                                                      with_kwargs=True)
    try:
        out = sample(c, plan, strip, steps=1)
    finally:
        handle.remove()
    canvas_hint = comfy.utils.common_upscale(strip.movedim(-1, 1), 384, 64, c.cn.upscale_algorithm, "center")
    # a zero-coefficient region (the chosen anchor window kept beside the graph) adds nothing and is skipped
    live = [r for r, k in zip(layout.regions, layout.coefficients) if k != 0]
    assert 0 < len(live) < len(layout.regions)
    assert len(hints) == len(live) and bool(torch.isfinite(out).all())
    assert any(p.turns for r in live for p in r.pieces)
    sizes = list(dict.fromkeys(r.size for r in live))  # the sampler batches regions by size
    called = [r for size in sizes for r in live if r.size == size]
    for hint, region in zip(hints, called):
        assert torch.equal(hint[0], gather(canvas_hint, region.scaled(8))[0].to(hint.dtype))


def test_cubemap_workflow_nodes_decode_without_seams_and_convert(c):
    """Sample a cubemap, decode each face inside its cube neighbours, and convert to equirectangular:
    cube edges in the decoded strip are as smooth as the faces' interiors, unlike a plain decode."""
    from controlsync.nodes.cubemap_to_equirect import CubemapToEquirect
    from controlsync.nodes.loop_decode import LoopDecode
    from controlsync.sampling.cubemap import pad_faces
    strip = cube_strip(c)
    plan = c.Collage.execute("cubemap", 64, 64, 64, 64, 32, "horizontal", 0, image=strip).args[0]
    with torch.inference_mode():
        vae = c.tm.tiny_vae()
        latent = {"samples": sample(c, plan, strip, steps=4)}
        cube = LoopDecode.execute(latent, vae, 4, "cubemap").args[0]
        plain = vae.decode(latent["samples"])
        equirect = CubemapToEquirect.execute(cube, 0).args[0]
    assert cube.shape == plain.shape == (1, 64, 384, 3) and equirect.shape == (1, 128, 256, 3)

    def edge_ratio(image):
        """Mean jump across the cube's edges (each face grown by one pixel of its neighbours) over the mean
        jump between neighbouring pixels inside faces."""
        faces = pad_faces(image[0].movedim(-1, 0).double(), 1)
        across = torch.cat([torch.cat([(f[:, 0, 1:-1] - f[:, 1, 1:-1]), (f[:, -1, 1:-1] - f[:, -2, 1:-1]),
                                       (f[:, 1:-1, 0] - f[:, 1:-1, 1]), (f[:, 1:-1, -1] - f[:, 1:-1, -2])], -1)
                            for f in faces], -1).abs().mean()
        inside = torch.cat([(f[:, 1:-1, 2:-1] - f[:, 1:-1, 1:-2]).abs().flatten() for f in faces]).mean()
        return (across / inside).item()

    ratios = edge_ratio(cube), edge_ratio(plain)
    print(f"[collage] cubemap edge score (across cube edges / inside faces): cube decode {ratios[0]:.2f}, "
          f"plain decode {ratios[1]:.2f}")
    assert ratios[0] < 1.5 and ratios[0] < ratios[1]


def test_bad_cubemap_inputs_name_the_input(c):
    from controlsync.nodes.cubemap_to_equirect import CubemapToEquirect
    from controlsync.nodes.equirect_to_cubemap import EquirectToCubemap
    from controlsync.nodes.loop_decode import LoopDecode
    with pytest.raises(ValueError, match="width / height: cubemap faces must be square; got a 512x256"):
        c.Collage.execute("cubemap", 512, 256, 256, 256, 128, "horizontal", 0)
    with pytest.raises(ValueError, match="image: a cubemap canvas is a strip of 6 square faces"):
        c.Collage.execute("cubemap", 64, 64, 64, 64, 32, "horizontal", 0, image=c.image)
    with pytest.raises(ValueError, match="window_height must equal the face size"):
        c.Collage.execute("cubemap", 64, 64, 64, 32, 32, "horizontal", 0)
    with pytest.raises(ValueError, match="image: an equirectangular image is twice as wide as high"):
        EquirectToCubemap.execute(c.image, 64)
    with pytest.raises(ValueError, match="image: a cubemap is a strip of 6 square faces"):
        CubemapToEquirect.execute(c.image, 0)
    with pytest.raises(ValueError, match="samples: a cubemap is a strip"):
        LoopDecode.execute({"samples": torch.zeros(1, 4, 8, 32)}, None, 4, "cubemap")


# --- conditional generation: Reconstruction and the autoregressive baselines ---------------------

def outpaint_case():
    g = torch.Generator().manual_seed(5)
    known = torch.randn(1, 4, 8, 32, generator=g)
    mask = torch.ones(1, 64, 256)
    mask[:, :, 96:160] = 0.0  # known: latent columns 12..19
    cells = torch.zeros(1, 1, 8, 32)
    cells[..., 12:20] = 1.0
    return known, mask, cells


def test_reconstruction_lowers_the_known_residual_step_by_step(c):
    """Joint DiffCollage with Reconstruction: ||H x0 - y|| of the step's x0-prediction (ComfyUI's own
    sampler callback) falls step by step, and the result holds the known cells; no mask at all does not."""
    import comfy.sample
    from controlsync.nodes import bridge
    known, mask, cells = outpaint_case()
    plan = c.Collage.execute("chain", 2048, 512, 64, 64, 32, "horizontal", 0, known_pixels="reconstruction",
                             image=c.image).args[0]
    pos, neg = conds(c, c.image)
    residuals = []
    with torch.inference_mode():
        y = c.model.model.process_latent_in(known)
        out = comfy.sample.sample(bridge.windowed_model(c.model, plan, 1), comfy.sample.prepare_noise(known, 7), 6,
                                  7.5, "euler", "normal", pos, neg, known, noise_mask=mask, seed=7,
                                  callback=lambda i, x0, x, n: residuals.append(float(((x0 - y) * cells).norm())))
        free = comfy.sample.sample(bridge.windowed_model(c.model, plan, 1), comfy.sample.prepare_noise(known, 7), 6,
                                   7.5, "euler", "normal", pos, neg, known, seed=7)
    print(f"[collage] reconstruction ||H x0 - y|| per step: {', '.join(f'{r:.3g}' for r in residuals)}")
    assert all(b < a for a, b in zip(residuals, residuals[1:])) and residuals[-1] < 0.01 * residuals[0]
    held, unheld = (((o - known) * cells).norm() / (known * cells).norm() for o in (out, free))
    assert held < 1e-2 < 0.5 < unheld


@pytest.mark.parametrize("method", ["replacement", "reconstruction"])
def test_autoregressive_baselines_outpaint_window_after_window(c, method):
    """Each factor is a whole sampling run outpainting from what is known: the known cells stay, every
    cell is generated, and the joint run from the same seed differs (it is another method)."""
    known, mask, cells = outpaint_case()
    latent = {"samples": known, "noise_mask": mask}
    ar = c.Collage.execute("chain", 2048, 512, 64, 64, 32, "horizontal", 0, known_pixels=method, order="autoregressive",
                           image=c.image).args[0]
    joint = c.Collage.execute("chain", 2048, 512, 64, 64, 32, "horizontal", 0, known_pixels=method, image=c.image).args[0]
    out = sample(c, ar, c.image, latent=latent, steps=4)
    assert out.shape == known.shape and bool(torch.isfinite(out).all())
    tolerance = 1e-5 if method == "replacement" else 2e-2
    assert ((out - known) * cells).abs().max() <= tolerance * known.abs().max()
    assert ((out - known) * (1 - cells)).abs().mean() > 0.1
    assert not torch.allclose(out, sample(c, joint, c.image, latent=latent, steps=4), atol=1e-3)


def test_autoregressive_without_known_pixels_starts_at_the_first_factor(c):
    """Nothing known: factor 0 is sampled first, alone - exactly a KSampler run on its crop of the canvas noise."""
    import comfy.sample
    from controlsync.nodes import bridge
    from controlsync.sampling import gather
    ar = c.Collage.execute("chain", 2048, 512, 64, 64, 32, "horizontal", 0, order="autoregressive", image=c.image).args[0]
    empty = torch.zeros(1, 4, 8, 32)
    out = sample(c, ar, c.image, latent={"samples": empty}, steps=3)
    layout = ar.layout((8, 32), 8)
    first = layout.regions[0]
    pos, neg = conds(c, c.image)
    with torch.inference_mode():
        alone = comfy.sample.sample(bridge.windowed_model(c.model, ar, 1, focus=((1, 4, 8, 32), 0)),
                                    gather(comfy.sample.prepare_noise(empty, 7), first), 3, 7.5, "euler", "normal",
                                    pos, neg, gather(empty, first).contiguous(), seed=7)
    # factor 1 overwrites the first factor's right half (Replacement keeps it there up to the sampler's last step)
    assert torch.allclose(out[..., :4], alone[..., :4], atol=1e-5)


def test_bad_noise_mask_names_the_input(c):
    known, _, _ = outpaint_case()
    plan = collage(c, "chain", c.image)
    with pytest.raises(ValueError, match="latent_image: its noise mask is 200x64 but the canvas is 256x64 px"):
        sample(c, plan, c.image, latent={"samples": known, "noise_mask": torch.ones(1, 64, 200)})


def test_coherence_report_measures_drift_to_the_cubemap_anchor_chosen(c):
    """Coherence Report on a cubemap: one drift value per window (20: the 19 in the merge and the default anchor,
    window 0 - the left face, which cancels out of the merge), each the LPIPS to exactly the left face."""
    import re
    import lpips_weights
    from controlsync.nodes import bridge
    from controlsync.nodes.coherence_report import CoherenceReport
    from controlsync.sampling import gather
    lpips_weights.use_cached_backbones()
    strip = cube_strip(c)
    plan = c.Collage.execute("cubemap", 64, 64, 64, 64, 32, "horizontal", 0, image=strip).args[0]
    with torch.inference_mode():
        _, report = CoherenceReport.execute(strip, 64, "alex", plan).args
    drift = [float(v) for v in re.search(r"drift per window ([0-9. ]+)", report)[1].split()]
    layout = plan.layout((8, 48), 8)
    windows = [r for i, r in enumerate(layout.regions) if layout.factors_of[i] == (i,)]
    assert len(drift) == len(windows) == 20
    image = strip[0].movedim(-1, 0).float() * 2 - 1
    left_face = image[:, :, :64]
    loss = bridge.load_lpips("alex", "cpu")
    with torch.no_grad():
        expected = [float(loss(gather(image, r.scaled(8))[None], left_face[None], normalize=False)) for r in windows]
    assert drift.count(0.0) == 1 and drift[0] == 0.0
    assert all(abs(a - b) < 1e-3 for a, b in zip(drift, expected)), (drift, expected)
