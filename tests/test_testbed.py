"""The analytic test bed: the pack's merge and sync code on a world with a known answer (plain torch)."""
import math

import torch

from comfy_host import load_sampling

S = load_sampling()
from controlsync_sampling import testbed as T  # noqa: E402
from controlsync_sampling.sync import SyncSchedule  # noqa: E402


def test_global_style_world_orders_the_methods_as_the_papers_claim():
    """Style spread across windows (0 = one style everywhere): sync < joint averaging < independent."""
    world = T.GlobalStyleWorld(length=48, tau=1.0, delta=0.3)
    plan = S.WindowPlan((8, 8 * 48), (8, 8 * 16), (8, 8 * 8)).layout((1, 48), 8)
    n = 1000
    g = torch.Generator().manual_seed(7)
    truth = torch.randn(n, 1, generator=g, dtype=torch.float64) * world.tau + \
        torch.randn(n, 48, generator=g, dtype=torch.float64) * world.delta
    spread = {
        "true samples": T.style_spread(T.window_values(truth, plan)),
        "independent windows": T.style_spread(T.sample_independent(world, plan, n, seed=1)),
        "joint averaging": T.style_spread(T.window_values(T.sample(world, plan, n, seed=1), plan)),
        "sync (w 20, 0.95, 10 of 60 steps)": T.style_spread(T.window_values(
            T.sample(world, plan, n, seed=1, sync=SyncSchedule(20.0, 0.95, 10, 60)), plan)),
    }
    print("[testbed] style spread across 5 windows, 1000 samples: "
          + ", ".join(f"{k} {v:.3f}" for k, v in spread.items()))
    assert spread["sync (w 20, 0.95, 10 of 60 steps)"] < 0.5 * spread["joint averaging"]
    assert spread["joint averaging"] < 0.75 * spread["independent windows"]
    # sync reaches the truth's level (detail only), averaging does not
    assert spread["sync (w 20, 0.95, 10 of 60 steps)"] < 2 * spread["true samples"] < spread["joint averaging"]


def averaging_reference(world, n, steps, seed):
    """MultiDiffusion on the 48-cell world written out here: windows of 16 cells every 8, each denoised by the
    exact denoiser of its own marginal, averaged per cell, an Euler step (the test bed's noise and schedule)."""
    sigmas = torch.cat([torch.exp(torch.linspace(math.log(40.0), math.log(2e-3), steps, dtype=torch.float64)),
                        torch.zeros(1, dtype=torch.float64)])
    x = torch.randn(n, 48, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sigmas[0]
    cov = world.tau ** 2 * torch.ones(16, 16, dtype=torch.float64) + world.delta ** 2 * torch.eye(16, dtype=torch.float64)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        total, count = torch.zeros_like(x), torch.zeros(48, dtype=torch.float64)
        for start in (0, 8, 16, 24, 32):
            cells = slice(start, start + 16)
            total[:, cells] += x[:, cells] @ torch.linalg.solve(cov + s ** 2 * torch.eye(16, dtype=torch.float64), cov)
            count[cells] += 1
        x = x + (s_next - s) * (x - total / count) / s
    return x


def test_sync_weight_zero_is_plain_averaging_in_the_test_bed():
    """w = 0 runs the test bed's sync code (gradients, deltas, the folded update) and must leave plain averaging,
    written out here, unchanged; a small w already moves the result (the sync path is live)."""
    world = T.GlobalStyleWorld()
    plan = S.WindowPlan((8, 8 * 48), (8, 8 * 16), (8, 8 * 8)).layout((1, 48), 8)
    reference = averaging_reference(world, 50, 20, seed=3)
    plain = T.sample(world, plan, 50, steps=20, seed=3)
    zero = T.sample(world, plan, 50, steps=20, seed=3, sync=SyncSchedule(0.0, 0.95, 10, 20))
    small = T.sample(world, plan, 50, steps=20, seed=3, sync=SyncSchedule(0.05, 0.95, 10, 20))
    assert torch.allclose(plain, reference, rtol=1e-10, atol=1e-12)
    assert torch.allclose(zero, reference, rtol=1e-10, atol=1e-12)
    moved = float((small - reference).norm() / reference.norm())
    print(f"[testbed] w 0.05 moves the samples by {moved:.1e} (relative) from plain averaging; w 0 by "
          f"{float((zero - reference).norm() / reference.norm()):.1e}")
    assert moved > 1e-6


def test_fast_mode_keeps_the_exact_modes_improvement_in_the_test_bed():
    """The fast mode (one evaluation per window, the denoiser's slope along the gradient estimated from it)
    against the exact mode: the improvement in style spread over joint averaging, w 20 and 5."""
    world = T.GlobalStyleWorld(length=48, tau=1.0, delta=0.3)
    plan = S.WindowPlan((8, 8 * 48), (8, 8 * 16), (8, 8 * 8)).layout((1, 48), 8)
    averaging = T.style_spread(T.window_values(T.sample(world, plan, 1000, seed=1), plan))
    for weight in (20.0, 5.0):
        sync = SyncSchedule(weight, 0.95, 10, 60)
        exact = T.style_spread(T.window_values(T.sample(world, plan, 1000, seed=1, sync=sync), plan))
        fast = T.style_spread(T.window_values(T.sample(world, plan, 1000, seed=1, sync=sync, fast=True), plan))
        ratio = (averaging - fast) / (averaging - exact)
        print(f"[testbed] w {weight}: style spread averaging {averaging:.4f}, exact {exact:.4f}, fast {fast:.4f}: "
              f"fast keeps {100 * ratio:.1f}% of the exact mode's improvement")
        assert ratio > 0.9


def test_fast_mode_is_right_on_data_with_a_mean_and_on_flow_models():
    """Real latents have channel means, and flow models sample x = (1 - sigma) x0 + sigma eps: the fast mode's slope
    estimate (one forward difference along the move) is exact for the affine denoisers of such data, so it keeps
    the exact mode's improvement over joint averaging there too."""
    plan = S.WindowPlan((8, 8 * 48), (8, 8 * 16), (8, 8 * 8)).layout((1, 48), 8)
    # this world's style loss is a squared mean difference, not LPIPS: w 20 suits its VE schedule (sigma 40 down),
    # on the flow schedule (sigma 1 down, steps of scale (1 - sigma)^2 + sigma^2 <= 1) w 20 overshoots and w 5 suits
    for world, weight in ((T.GlobalStyleWorld(mean=0.5), 20.0), (T.GlobalStyleWorld(parameterisation="flow"), 5.0),
                          (T.GlobalStyleWorld(mean=0.5, parameterisation="flow"), 5.0)):
        sync = SyncSchedule(weight, 0.95, 10, 60)
        averaging = T.style_spread(T.window_values(T.sample(world, plan, 500, seed=1), plan))
        exact = T.style_spread(T.window_values(T.sample(world, plan, 500, seed=1, sync=sync), plan))
        fast = T.style_spread(T.window_values(T.sample(world, plan, 500, seed=1, sync=sync, fast=True), plan))
        kept = (averaging - fast) / (averaging - exact)
        print(f"[testbed] mean {world.mean}, {world.parameterisation}: style spread averaging {averaging:.4f}, exact "
              f"{exact:.4f}, fast {fast:.4f}: fast keeps {100 * kept:.1f}% of the exact mode's improvement")
        assert averaging - exact > 0.5 * averaging  # the sync matters here
        assert kept > 0.95
