"""Conditional generation on a collage, on the analytic test bed (exact Gaussian denoisers, plain torch)."""
import math

import pytest
import torch

from comfy_host import load_sampling

S = load_sampling()
from controlsync_sampling import cubemap, testbed  # noqa: E402
from controlsync_sampling.collage import FactorGraphPlan  # noqa: E402
from controlsync_sampling.conditional import (Masking, autoregressive_order, reconstruct,  # noqa: E402
                                              reconstruction_correction)


def outpainting_case():
    world = testbed.GlobalStyleWorld()
    plan = FactorGraphPlan("chain", (8, 8 * 48), (8, 8 * 16), 8 * 8).layout((1, 48), 8)
    g = torch.Generator().manual_seed(1)
    truth = torch.randn(200, 48, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(world.covariance(48)).T
    mask = torch.zeros(48, dtype=torch.float64)
    mask[:10] = 1
    return world, plan, truth * mask, mask


def masked(mask):
    """The known cells as the test bed's observation of its (N, 1, 1, L) canvas."""
    return Masking(mask.view(1, 1, 1, -1))


def test_reconstruction_lowers_the_known_residual_step_by_step():
    """With exact denoisers (symmetric Jacobians in [0, I)), each Reconstruction step shrinks ||H x0 - y||;
    with no guidance the known cells are not reached at all."""
    world, plan, known, mask = outpainting_case()
    x, trace = testbed.sample_conditional(world, plan, masked(mask), known, "reconstruction", 1.0)
    later = trace[10:]  # after the first steps, where the prediction is still mostly the prior's mean
    print(f"[conditional] reconstruction ||H x0 - y||: {trace[0]:.3f} -> {trace[20]:.3f} -> {trace[40]:.2e} -> {trace[-1]:.1e}")
    assert all(b <= a * (1 + 1e-9) for a, b in zip(later, later[1:])) and trace[-1] < 1e-3 * trace[0]
    assert float(((x - known) * mask).norm(dim=1).mean()) < 1e-3
    free, _ = testbed.sample_conditional(world, plan, masked(mask), known, "none")
    assert float(((free - known) * mask).norm(dim=1).mean()) > 1.0


def replacement_reference(world, known, mask, steps=60, seed=0):
    """DiffCollage's Replacement on the chain, written out here: every step the DiffCollage merge of the exact
    marginal denoisers (factors of 16 cells every 8 at +1, their 8-cell overlaps at -1), the x0-prediction
    projected onto the known cells, an Euler step, and x_t on the known cells set to y noised to the next
    level (fresh noise each step: the test bed's noise stream)."""
    sigmas = torch.cat([torch.exp(torch.linspace(math.log(40.0), math.log(2e-3), steps, dtype=torch.float64)),
                        torch.zeros(1, dtype=torch.float64)])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*known.shape, generator=g, dtype=torch.float64) * sigmas[0]
    regions = [(range(s, s + 16), 1.0) for s in (0, 8, 16, 24, 32)] + [(range(s, s + 8), -1.0) for s in (8, 16, 24, 32)]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x0 = torch.zeros_like(x)
        for cells, c in regions:
            idx = list(cells)
            cov = world.covariance(len(idx))
            x0[:, idx] += c * x[:, idx] @ torch.linalg.solve(cov + s ** 2 * torch.eye(len(idx), dtype=torch.float64), cov)
        x0 = x0 * (1 - mask) + known * mask
        x = x + (s_next - s) * (x - x0) / s
        x = x * (1 - mask) + (known + s_next * torch.randn(x.shape, generator=g, dtype=torch.float64)) * mask
    return x


def test_replacement_is_the_papers_projection():
    """The test bed's joint Replacement equals the loop above (merge, projection, Euler step, re-noised known
    cells), and ends exactly on the known cells."""
    world, plan, known, mask = outpainting_case()
    replaced, _ = testbed.sample_conditional(world, plan, masked(mask), known, "replacement", noised_known=True)
    reference = replacement_reference(world, known, mask)
    assert torch.allclose(replaced, reference, rtol=1e-9, atol=1e-10)
    assert torch.equal(reference * mask, known * mask)


def test_autoregressive_order_grows_out_of_the_known_pixels():
    plan = FactorGraphPlan("chain", (8, 8 * 48), (8, 8 * 16), 8 * 8).layout((1, 48), 8)
    factors = [i for i, f in enumerate(plan.factors_of) if f == (i,)]
    assert autoregressive_order(plan, torch.zeros(1, 48)) == factors  # nothing known: left to right
    known = torch.zeros(1, 48)
    known[:, 20:28] = 1  # the middle factor (cells 16..31) holds them all
    order = autoregressive_order(plan, known)
    assert order[0] == 2 and sorted(order) == factors
    assert order.index(1) < order.index(0) and order.index(3) < order.index(4)
    cube = FactorGraphPlan("cubemap", (64, 384), (64, 64), 32).layout((8, 48), 8)
    # every window that counts in the merge; not the default anchor, a window kept at coefficient 0
    order = autoregressive_order(cube, torch.zeros(8, 48))
    assert sorted(order) == [i for i, (f, c) in enumerate(zip(cube.factors_of, cube.coefficients)) if f == (i,) and c]
    assert len(order) == 19 and cube.anchor not in order


# --- Reconstruction as the gradient of the whole collage's x0 error ------------------------------


def cell_index(region, width):
    """The flat canvas index of every cell of a region, assembled here from its pieces (turned as torch.rot90)."""
    out = torch.empty(region.size, dtype=torch.long)
    for p in region.pieces:
        (sy, sx), (dy, dx), (h, w) = p.src, p.dst, p.size
        block = (torch.arange(sy, sy + h)[:, None] * width + torch.arange(sx, sx + w)[None, :])
        block = torch.rot90(block, p.turns, dims=(0, 1))
        out[dy:dy + block.shape[0], dx:dx + block.shape[1]] = block
    return out


def ramp(size, feather):
    h, w = size
    if feather <= 0:
        return torch.ones(size, dtype=torch.float64)
    return torch.tensor([[min(1.0, (min(a, h - 1 - a, b, w - 1 - b) + 1) / (feather + 1)) for b in range(w)]
                         for a in range(h)], dtype=torch.float64)


def merged_x0(plan, x, denoise):
    """The collage's x0(x) = sum_R c_R m_R D_R(x_R) / sum_R c_R m_R, written out as one autograd graph."""
    H, W = plan.canvas
    flat = x.flatten(-2)
    num = torch.zeros_like(flat)
    den = torch.zeros(H * W, dtype=x.dtype)
    for i, (region, c) in enumerate(zip(plan.regions, plan.coefficients)):
        idx = cell_index(region, W)
        weight = c * ramp(region.size, plan.feather)
        num = num.index_add(-1, idx.flatten(), (denoise(i, flat[..., idx]) * weight).flatten(-2))
        den = den.index_add(0, idx.flatten(), weight.flatten())
    return (num / den).view_as(x)


def tiny_denoisers(channels=2):
    """Region i's denoiser: a seeded 3x3 convolution, tanh and a skip, different for every region (any size)."""
    cache = {}

    def denoise(i, x):
        if i not in cache:
            g = torch.Generator().manual_seed(100 + i)
            cache[i] = (torch.randn(channels, channels, 3, 3, generator=g, dtype=torch.float64) * 0.4,
                        0.3 + 0.4 * torch.rand(1, generator=g, dtype=torch.float64))
        kernel, skip = cache[i]
        return torch.tanh(torch.nn.functional.conv2d(x, kernel, padding=1)) + skip * x
    return denoise


def reconstruction_plans():
    return {
        "chain": FactorGraphPlan("chain", (48, 160), (48, 64), 32).layout((6, 20), 8),
        "cycle": FactorGraphPlan("cycle", (32, 192), (32, 64), 32).layout((4, 24), 8),
        "grid (Kikuchi)": FactorGraphPlan("grid", (96, 96), (48, 48), 24).layout((12, 12), 8),
        "corner_grid": FactorGraphPlan("corner_grid", (64, 96), (32, 32), 16).layout((8, 12), 8),
        "cubemap": cubemap.cubemap_plan(4, 4, 2),  # turned pieces, and the anchor at coefficient 0
        "feathered windows": S.WindowPlan((48, 160), (48, 64), (8, 24), blend="feather").layout((6, 20), 8),
    }


@pytest.mark.parametrize("name", list(reconstruction_plans()))
def test_collage_reconstruction_is_the_gradient_of_the_merged_x0_error(name):
    """Against autograd through the whole merged x0 (one graph, written above): equal to float64 rounding, for
    a hard and a soft mask; the per-region form used today (each region pulled by its own residual, merged)
    is reported next to it."""
    plan = reconstruction_plans()[name]
    H, W = plan.canvas
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 2, H, W, generator=g, dtype=torch.float64)
    known = torch.randn(2, 2, H, W, generator=g, dtype=torch.float64)
    denoise = tiny_denoisers()
    weight = 1.5
    for kind in ("hard", "soft"):
        mask = torch.zeros(1, 1, H, W, dtype=torch.float64)
        mask[..., :, : W // 3] = 1.0  # an outpainting band
        mask[..., H // 2, W // 2:] = 1.0  # and a scattered row
        if kind == "soft":
            mask = mask * 0.7 + 0.1 * torch.rand(1, 1, H, W, generator=g, dtype=torch.float64)
        leaf = x.clone().requires_grad_(True)
        x0 = merged_x0(plan, leaf, denoise)
        (expected,) = torch.autograd.grad((weight / 2) * (mask * (x0 - known)).pow(2).sum(), leaf)
        got = reconstruct(plan, x, lambda b, v: denoise(b[0], v), x0.detach(), Masking(mask), mask * known, weight)
        assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12), (name, kind)
        assert float(expected.norm()) > 0
    called = []
    first_column = torch.zeros(1, 1, H, W, dtype=torch.float64).index_fill_(-1, torch.tensor([0]), 1.0)
    reconstruct(plan, x, lambda b, v: called.append(b[0]) or denoise(b[0], v), x0.detach(), Masking(first_column),
                first_column * known, weight)
    # a call only for regions whose merge weight touches a known cell (here: the canvas's first column)
    assert called and len(called) < len(plan.regions) and all(plan.coefficients[i] != 0 for i in called)
    # the per-region form: each region's own residual, the corrections merged like predictions
    corrections = []
    for i, region in enumerate(plan.regions):
        corrections.append(reconstruction_correction(S.gather(x, region), lambda v, i=i: denoise(i, v),
                                                     S.gather(known.expand_as(x), region),
                                                     S.gather(mask.expand_as(x), region), weight)[0])
    per_region = S.merge(plan, corrections)
    deviation = float((per_region - expected).norm() / expected.norm())
    print(f"[conditional] {name}: per-region Reconstruction vs the merged x0's gradient: relative difference {deviation:.3f}")
    assert deviation > 1e-3  # overlapping regions: the per-region form is another correction


def test_collage_reconstruction_lowers_the_known_residual_on_the_test_bed():
    """On the analytic test bed (exact Gaussian denoisers), Reconstruction as the gradient of the merged x0's
    error brings ||H x0 - y|| down step by step, like the per-region form, and holds the known cells."""
    world, plan, known, mask = outpainting_case()
    x, trace = testbed.sample_conditional(world, plan, masked(mask), known, "collage_reconstruction", 1.0)
    _, per_region = testbed.sample_conditional(world, plan, masked(mask), known, "reconstruction", 1.0)
    later = trace[10:]
    print(f"[conditional] collage reconstruction ||H x0 - y||: {trace[0]:.3f} -> {trace[20]:.3f} -> {trace[40]:.2e} -> "
          f"{trace[-1]:.1e} (per-region form: {per_region[0]:.3f} -> {per_region[20]:.3f} -> {per_region[40]:.2e} -> "
          f"{per_region[-1]:.1e})")
    assert all(b <= a * (1 + 1e-9) for a, b in zip(later, later[1:])) and trace[-1] < 1e-3 * trace[0]
    assert float(((x - known) * mask).norm(dim=1).mean()) < 1e-3
