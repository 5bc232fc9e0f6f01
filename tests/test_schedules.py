"""AnchorSync's schedule: which steps are synced and with which weight, against values worked out by
hand from the papers' rule (w 20, decay 0.95, the first 10 of 50 steps) - plain torch, no ComfyUI."""
import math

import pytest

from comfy_host import load_sampling

load_sampling()
from controlsync_sampling.sync import SyncSchedule, noise_level  # noqa: E402

# (sync_steps of 50, steps) -> synced steps, worked out by hand: round half up of sync_steps * steps / 50
HAND_COUNTS = {
    (10, 20): 4, (10, 25): 5, (10, 30): 6, (10, 50): 10, (10, 1000): 200,
    (5, 20): 2, (5, 25): 3, (5, 30): 3, (5, 50): 5, (5, 1000): 100,   # 5 of 50 at 25 steps: 2.5 -> 3 (not 2)
    (7, 30): 4, (3, 25): 2,                                            # 4.2 -> 4, 1.5 -> 2
}


@pytest.mark.parametrize("key", sorted(HAND_COUNTS))
def test_synced_step_count_rounds_half_up(key):
    sync_steps, steps = key
    weights = SyncSchedule(20.0, 0.95, sync_steps).step_weights([1.0] * (steps + 1), None, (0, steps))
    assert sum(w > 0 for w in weights) == HAND_COUNTS[key]
    assert all(w > 0 for w in weights[:HAND_COUNTS[key]]) and not any(weights[HAND_COUNTS[key]:])


def test_decay_is_per_50_step_equivalent():
    s = SyncSchedule(20.0, 0.95, 10)
    # a step of a 25-step schedule is two of the papers' steps: 0.95^2 per step
    assert s.step_weights([1.0] * 26, None, (0, 25)) == pytest.approx(
        [20.0, 20 * 0.95 ** 2, 20 * 0.95 ** 4, 20 * 0.95 ** 6, 20 * 0.95 ** 8] + [0.0] * 20, rel=1e-12)
    assert s.step_weights([1.0] * 51, None, (0, 50))[:11] == pytest.approx([20 * 0.95 ** i for i in range(10)] + [0.0])
    w1000 = s.step_weights([1.0] * 1001, None, (0, 1000))
    assert w1000[199] == pytest.approx(20 * 0.95 ** (199 / 20)) and w1000[200] == 0.0
    w20 = s.step_weights([1.0] * 21, None, (0, 20))
    assert w20[:5] == pytest.approx([20.0, 20 * 0.95 ** 2.5, 20 * 0.95 ** 5, 20 * 0.95 ** 7.5, 0.0])
    w30 = s.step_weights([1.0] * 31, None, (0, 30))
    assert w30[5] == pytest.approx(20 * 0.95 ** (5 * 50 / 30)) and w30[6] == 0.0


def test_denoise_counts_in_the_longer_schedule():
    """KSampler's denoise 0.9 at 20 steps samples the last 20 of int(20 / 0.9) = 22 steps: steps 2 and 3 of
    those 22 are inside the first floor(10 * 22 / 50 + 0.5) = 4, so the run's first two steps are synced."""
    s = SyncSchedule(20.0, 0.95, 10)
    weights = s.step_weights([1.0] * 21, None, (2, 22))
    assert weights[:3] == pytest.approx([20 * 0.95 ** (2 * 50 / 22), 20 * 0.95 ** (3 * 50 / 22), 0.0])
    assert not any(weights[2:])


def test_partial_schedules_follow_the_noise_level():
    """Split or custom sigmas: a step is synced while its noise level (0 = noise, 1 = clean, as ControlNet
    start/end percents) is below 10/50; here a linear map sigma = 10 (1 - p)."""
    def percent_to_sigma(p):
        return 10.0 * (1.0 - p)
    assert noise_level(8.5, percent_to_sigma) == pytest.approx(0.15, abs=1e-12)
    weights = SyncSchedule(20.0, 0.95, 10).step_weights([9.5, 8.5, 7.0, 0.0], lambda s: noise_level(s, percent_to_sigma))
    assert weights == pytest.approx([20 * 0.95 ** 2.5, 20 * 0.95 ** 7.5, 0.0])
    # a level exactly at the cut is not synced
    assert SyncSchedule(20.0, 0.95, 10).step_weights([8.0, 0.0], lambda s: noise_level(s, percent_to_sigma)) == [0.0]


def test_weight_zero_syncs_nothing():
    assert SyncSchedule(0.0, 0.95, 10).step_weights([1.0] * 51, None, (0, 50)) == [0.0] * 50
    assert not math.isnan(SyncSchedule(20.0, 0.95, 0).step_weights([1.0] * 51, None, (0, 50))[0])
    assert SyncSchedule(20.0, 0.95, 0).step_weights([1.0] * 51, None, (0, 50)) == [0.0] * 50


def test_counting_from_the_run_syncs_the_first_steps_that_run():
    """img2img: KSampler's denoise 0.5 at 20 steps samples the last 20 of int(20 / 0.5) = 40 steps. Counted
    from the schedule (the papers) none of them is among its first floor(10 * 40 / 50 + 0.5) = 8; counted from
    the run, the first floor(10 * 20 / 50 + 0.5) = 4 of the 20 are, decaying per 50-step-equivalent of the run
    (0.95^2.5 a step). A run that starts the schedule is counted the same either way."""
    papers, run = SyncSchedule(20.0, 0.95, 10), SyncSchedule(20.0, 0.95, 10, start="run")
    assert papers.step_weights([1.0] * 21, None, (20, 40)) == [0.0] * 20
    assert run.step_weights([1.0] * 21, None, (20, 40)) == pytest.approx(
        [20.0, 20 * 0.95 ** 2.5, 20 * 0.95 ** 5, 20 * 0.95 ** 7.5] + [0.0] * 16, rel=1e-12)
    assert run.step_weights([1.0] * 26, None, (0, 25)) == papers.step_weights([1.0] * 26, None, (0, 25))
    with pytest.raises(ValueError, match="sync start"):
        SyncSchedule(start="denoise")


def test_counting_from_the_run_by_noise_level():
    """Split or custom sigmas counted from the run: levels measured from the run's first, (p - p0) / (1 - p0).
    sigma = 10 (1 - p): a run from sigma 5 (p0 = 0.5) through 4.5 (0.55), 3.8 (0.62): rebased 0, 0.1, 0.24, so
    the first two are synced (w 20 and 20 * 0.95^5); from the schedule's start none is (all past 0.2)."""
    def level(sigma):
        return noise_level(sigma, lambda p: 10.0 * (1.0 - p))
    sigmas = [5.0, 4.5, 3.8, 0.0]
    assert SyncSchedule(20.0, 0.95, 10, start="run").step_weights(sigmas, level) == pytest.approx(
        [20.0, 20 * 0.95 ** 5, 0.0], rel=1e-9)
    assert SyncSchedule(20.0, 0.95, 10).step_weights(sigmas, level) == [0.0, 0.0, 0.0]
