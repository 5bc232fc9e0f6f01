"""The analytic test bed: the pack's merge and sync code on a world with a known answer (plain torch)."""
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


def test_sync_weight_zero_is_plain_averaging_in_the_test_bed():
    world = T.GlobalStyleWorld()
    plan = S.WindowPlan((8, 8 * 48), (8, 8 * 16), (8, 8 * 8)).layout((1, 48), 8)
    plain = T.sample(world, plan, 50, steps=20, seed=3)
    zero = T.sample(world, plan, 50, steps=20, seed=3, sync=SyncSchedule(0.0, 0.95, 10))
    assert torch.equal(plain, zero)


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
