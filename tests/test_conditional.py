"""Conditional generation on a collage, on the analytic test bed (exact Gaussian denoisers, plain torch)."""
import torch

from comfy_host import load_sampling

S = load_sampling()
from controlsync_sampling import testbed  # noqa: E402
from controlsync_sampling.collage import FactorGraphPlan  # noqa: E402
from controlsync_sampling.conditional import autoregressive_order  # noqa: E402


def outpainting_case():
    world = testbed.GlobalStyleWorld()
    plan = FactorGraphPlan("chain", (8, 8 * 48), (8, 8 * 16), 8 * 8).layout((1, 48), 8)
    g = torch.Generator().manual_seed(1)
    truth = torch.randn(200, 48, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(world.covariance(48)).T
    mask = torch.zeros(48, dtype=torch.float64)
    mask[:10] = 1
    return world, plan, truth * mask, mask


def test_reconstruction_lowers_the_known_residual_step_by_step():
    """With exact denoisers (symmetric Jacobians in [0, I)), each Reconstruction step shrinks ||H x0 - y||;
    Replacement holds it at 0; with no guidance the known cells are not reached at all."""
    world, plan, known, mask = outpainting_case()
    x, trace = testbed.sample_conditional(world, plan, known, mask, "reconstruction", 1.0)
    later = trace[10:]  # after the first steps, where the prediction is still mostly the prior's mean
    print(f"[conditional] reconstruction ||H x0 - y||: {trace[0]:.3f} -> {trace[20]:.3f} -> {trace[40]:.2e} -> {trace[-1]:.1e}")
    assert all(b <= a * (1 + 1e-9) for a, b in zip(later, later[1:])) and trace[-1] < 1e-3 * trace[0]
    assert float(((x - known) * mask).norm(dim=1).mean()) < 1e-3
    _, replaced = testbed.sample_conditional(world, plan, known, mask, "replacement")
    assert max(replaced) == 0.0
    free, _ = testbed.sample_conditional(world, plan, known, mask, "none")
    assert float(((free - known) * mask).norm(dim=1).mean()) > 1.0


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
