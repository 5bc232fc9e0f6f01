"""Canvas-global positions (a plan's `positions` input) on ComfyUI 0.33's tiny Flux and Z-Image: each window's
call equals a standalone call of the model shifted to the window's place by ComfyUI's own ScaleROPE node, the ids
the model's RoPE embedder gets are those a call on the whole canvas gives the window's tokens (with and without a
user's ScaleROPE), windows at different offsets never share a call, and what cannot work is refused."""
from __future__ import annotations

import pytest
import torch

H, W = 64, 192          # pixels
STARTS = [0, 4, 8, 12, 16]  # window starts, latent cells (64 px windows, 32 px stride)
PATCH = 2
TEXT_TOKENS = 12


@pytest.fixture(scope="module")
def p(comfy):
    import comfy.patcher_extension
    import comfy.samplers
    import comfy_extras.nodes_rope as rope
    import nodes
    import tiny_033 as t3
    import tiny_families as tf
    import tiny_models as tm
    from controlsync.nodes.controlsync_sampler import ControlSyncSampler
    from controlsync.nodes.factor_graph_collage import FactorGraphCollage
    from controlsync.nodes.window_planner import WindowPlanner
    from controlsync.nodes.windowed_model import ControlSyncWindowedModel

    class P:
        pass
    p = P()
    p.pe, p.samplers, p.nodes, p.ScaleROPE, p.tm = comfy.patcher_extension, comfy.samplers, nodes, rope.ScaleROPE, tm
    p.Planner, p.Collage, p.Sampler, p.Windowed = WindowPlanner, FactorGraphCollage, ControlSyncSampler, ControlSyncWindowedModel
    with torch.inference_mode():
        p.models = {"flux": t3.flux(), "zimage": t3.zimage()}
        p.conds = {"flux": (tf.text_cond("flux", 10, TEXT_TOKENS), tf.text_cond("flux", 11, TEXT_TOKENS)),
                   "zimage": (t3.text_cond(10, TEXT_TOKENS), t3.text_cond(11, TEXT_TOKENS))}
    return p


def plan(p, positions="canvas-global"):
    return p.Planner.execute(W, H, 64, 64, 32, "first", 0, "uniform", positions=positions).args[0]


def ksample(p, model, family, steps=1, cfg=4.0):
    pos, neg = p.conds[family]
    with torch.inference_mode():
        return p.nodes.common_ksampler(model, 5, steps, cfg, "euler", "simple", pos, neg,
                                       {"samples": torch.zeros(1, 16, H // 8, W // 8)})[0]["samples"]


def windowed(p, family, positions="canvas-global", batch=1, model=None):
    return p.Windowed.execute(model or p.models[family], plan(p, positions), batch).args[0]


def embedder(p, family):
    net = p.models[family].model.diffusion_model
    return net.pe_embedder if family == "flux" else net.rope_embedder


def image_ids(family, calls, tokens):
    """The image tokens' (t, y, x) ids of each model call, from what the RoPE embedder got: Flux embeds text then
    image ids in one call; Z-Image embeds the caption's ids, then the image's (padded) in a second call."""
    if family == "flux":
        return [ids[:, TEXT_TOKENS:TEXT_TOKENS + tokens] for ids in calls]
    return [ids[:, :tokens] for ids in calls[1::2]]


@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_each_window_equals_a_standalone_call_shifted_by_comfyuis_scale_rope(p, family):
    """Below the pack's wrapper each window's call is recorded and rerun as ComfyUI alone would run it on a model
    that ComfyUI's ScaleROPE node shifted to the window's place (in patches): equal bit for bit. (The tiny models'
    random weights barely depend on positions - window-local outputs differ by ~1e-6 relative - so what moves is
    checked on the ids, below.)"""
    calls, standalone = [], []

    def recorder(executor, model, conds, x, t, model_options, *args, **kwargs):
        out = executor(model, conds, x, t, model_options, *args, **kwargs)
        x0 = STARTS[len(calls) % len(STARTS)]
        shifted = p.ScaleROPE.execute(p.models[family], 1.0, x0 / PATCH, 1.0, 0.0, 1.0, 0.0).args[0]
        calls.append(out)
        standalone.append(p.samplers.calc_cond_batch(model, conds, x, t, shifted.model_options))
        return out
    model = windowed(p, family)
    model.add_wrapper_with_key(p.pe.WrappersMP.CALC_COND_BATCH, "test.record", recorder)
    ksample(p, model, family)
    assert len(calls) == len(STARTS)
    for ours, theirs in zip(calls, standalone):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("scale_rope", [None, (0.5, 3.0)], ids=["plain", "ScaleROPE"])
@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_window_ids_are_the_canvas_calls_ids_of_its_tokens(p, family, scale_rope):
    """A forward hook on the model's RoPE embedder: a call on the whole canvas (ComfyUI's KSampler) gives token
    (y, x) some id; with canvas-global positions the window's token at the same canvas place gets the same id -
    also on a model a ScaleROPE node scaled and shifted."""
    base = p.models[family]
    if scale_rope is not None:
        scale, shift = scale_rope
        base = p.ScaleROPE.execute(base, scale, shift, scale, shift, 1.0, 0.0).args[0]
    seen = []
    handle = embedder(p, family).register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    try:
        ksample(p, base, family, cfg=1.0)
        canvas = image_ids(family, seen, (H // 16) * (W // 16))[0][0].reshape(H // 16, W // 16, 3)
        seen.clear()
        ksample(p, windowed(p, family, model=base), family, cfg=1.0)
    finally:
        handle.remove()
    windows = image_ids(family, seen, (64 // 16) ** 2)
    assert len(windows) == len(STARTS)
    for x0, ids in zip(STARTS, windows):
        ids = ids[0].reshape(4, 4, 3)
        assert torch.equal(ids, canvas[:, x0 // PATCH:x0 // PATCH + 4])


def test_windows_at_different_offsets_never_share_a_call(p):
    """rope_options shifts a whole model call: with canvas-global positions and window_batch 3 every call holds one
    window; window-local positions batch three."""
    sizes = {}
    for positions in ("window-local", "canvas-global"):
        seen = []
        model = windowed(p, "flux", positions, batch=3)
        model.add_wrapper_with_key(p.pe.WrappersMP.CALC_COND_BATCH, "test.record",
                                   lambda e, m, c, x, *a, **k: seen.append(x.shape[0]) or e(m, c, x, *a, **k))
        ksample(p, model, "flux")
        sizes[positions] = seen
    assert sizes["window-local"] == [3, 2]
    assert sizes["canvas-global"] == [1] * len(STARTS)


def test_models_that_read_no_rope_options_are_refused(p):
    import tiny_033 as t3
    for model in (p.tm.tiny_model(0), t3.qwen()):
        with pytest.raises(ValueError, match="does not read"):
            windowed(p, "flux", model=model)


@pytest.mark.parametrize("graph", ["cycle", "cubemap"])
def test_loops_and_cubemaps_keep_window_local_positions(p, graph):
    width = 64 if graph == "cubemap" else 256  # a cubemap takes its face size
    with pytest.raises(ValueError, match="keeps window-local positions"):
        p.Collage.execute(graph, width, 64, 64, 64, 32, "horizontal", 0, positions="canvas-global")


def test_a_chains_factors_and_overlaps_take_their_canvas_positions(p):
    """A Factor Graph Collage chain's factors (and the overlaps between them) run at their canvas positions: the
    first call is the first factor at the origin, the others shifted (ids hook as above)."""
    seen = []
    handle = embedder(p, "flux").register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    collage = p.Collage.execute("chain", W, H, 64, 64, 32, "horizontal", 0, positions="canvas-global").args[0]
    try:
        model = p.Windowed.execute(p.models["flux"], collage, 1).args[0]
        ksample(p, model, "flux", cfg=1.0)
    finally:
        handle.remove()
    layout = collage.layout((H // 8, W // 8), 8, PATCH)
    starts = [r.rect[1] for r, c in zip(layout.regions, layout.coefficients) if c != 0]
    ids = [i[0, TEXT_TOKENS:].reshape(H // 16, -1, 3) for i in seen]
    assert len(ids) == len(starts)
    for x0, i in zip(starts, ids):
        assert i[0, 0, 2].item() == x0 // PATCH
