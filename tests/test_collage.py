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
    one_window = c.Planner.execute(64, 64, 64, 64, 64, "first", 0, "uniform", image=image).args[0]
    a, b = sample(c, one_factor, image), sample(c, one_window, image)
    pos, neg = conds(c, image)
    with torch.inference_mode():
        ref = c.nodes.common_ksampler(c.model, 7, 3, 7.5, "euler", "normal", pos, neg,
                                      {"samples": torch.zeros(1, 4, 8, 8)})[0]["samples"]
    assert torch.equal(a, b) and torch.equal(a, ref)


@pytest.mark.parametrize("graph", ["chain", "cycle", "grid"])
def test_graphs_sample_with_controlnet_crops(c, graph):
    image = c.image if graph != "grid" else c.tm.condition_image(128, 128)
    plan = collage(c, graph, image) if graph != "grid" else c.Collage.execute(
        "grid", 128, 128, 64, 64, 32, "horizontal", 0, image=image).args[0]
    out = sample(c, plan, image)
    assert bool(torch.isfinite(out).all()) and out.shape[-2:] == (image.shape[1] // 8, image.shape[2] // 8)


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
