"""AnchorSync's schedule: which steps are synced and with which weight, against values worked out by
hand from the papers' rule (w 20, decay 0.95, the first 10 of 50 steps) - plain torch, no ComfyUI."""
import math

import pytest

from comfy_host import load_sampling

load_sampling()
from controlsync_sampling.sync import SyncSchedule, locate, noise_level  # noqa: E402

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


def percent_to_sigma(p):
    """A linear map sigma = 10 (1 - p), p the noise level (0 = noise, 1 = clean), for the hand values below."""
    return 10.0 * (1.0 - p)


def level(sigma):
    return noise_level(sigma, percent_to_sigma)


def test_partial_schedules_follow_the_noise_level():
    """Sigmas that start below the top (their first step's noise level past 1/N) and are no ComfyUI schedule: a
    step is synced while its noise level (as ControlNet start/end percents) is below 10/50, with w * 0.95^(50 p)."""
    assert noise_level(8.5, percent_to_sigma) == pytest.approx(0.15, abs=1e-12)
    sigmas = [8.5, 8.2, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.0]  # 10 steps from level 0.15 > 1/10
    weights = SyncSchedule(20.0, 0.95, 10).step_weights(sigmas, level)
    assert weights == pytest.approx([20 * 0.95 ** 7.5, 20 * 0.95 ** 9] + [0.0] * 8)
    # a level exactly at the cut is not synced
    assert SyncSchedule(20.0, 0.95, 10).step_weights([8.0, 7.0, 0.0], level) == [0.0, 0.0]


def test_the_papers_own_ddim_timesteps_get_the_papers_weights():
    """The SyncDiffusion code's 50 DDIM timesteps ("leading": 981, 961, ..., 1, then alpha_bar[0], i.e. t = 0) given
    as sigmas: not a ComfyUI schedule, but from pure noise (the first step's level 18/999 < 1/50): the papers'
    w * 0.95^i on the first 10 steps."""
    timesteps = [981 - 20 * i for i in range(50)] + [0]
    sigmas = [percent_to_sigma((999 - t) / 999) for t in timesteps]
    weights = SyncSchedule(20.0, 0.95, 10).step_weights(sigmas, level)
    assert weights == pytest.approx([20 * 0.95 ** i for i in range(10)] + [0.0] * 40, rel=1e-12)


def test_split_schedules_are_found_in_the_whole_schedule():
    """SplitSigmas' halves are consecutive points of a whole schedule: `locate` finds where (the bridge offers
    ComfyUI's schedulers' whole schedules), and the halves sync the whole schedule's steps with its weights."""
    whole = [10.0 * (1 - i / 20) for i in range(20)] + [0.0]
    others = [[5.0, 4.0, 0.0], [10.0 * (1 - i / 19) for i in range(19)] + [0.0]]
    high, low = whole[:3], whole[2:]
    assert locate(high, others + [whole]) == (0, 20) and locate(low, others + [whole]) == (2, 20)
    assert locate([9.0, 8.0, 0.0], others + [whole]) is None
    s = SyncSchedule(20.0, 0.95, 10)
    full = s.step_weights(whole, level, (0, 20))
    assert s.step_weights(high, level, (0, 20)) + s.step_weights(low, level, (2, 20)) == pytest.approx(full)


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
    # the upscale workflow: denoise 0.45 at 25 steps runs the last 25 of int(25 / 0.45) = 55; counted from the run
    # its first floor(10 * 25 / 50 + 0.5) = 5 are synced (0.95^2 a step), from the schedule none (its first 11)
    assert run.step_weights([1.0] * 26, None, (30, 55)) == pytest.approx(
        [20.0 * 0.95 ** (2 * i) for i in range(5)] + [0.0] * 20, rel=1e-12)
    assert papers.step_weights([1.0] * 26, None, (30, 55)) == [0.0] * 25
    with pytest.raises(ValueError, match="sync start"):
        SyncSchedule(start="denoise")


def test_counting_from_the_run_takes_any_sigmas_as_a_whole_schedule():
    """Split, cut or custom sigmas counted from the run are a whole schedule of their own N steps, wherever they sit
    in the noise range or a longer schedule: 10 steps from sigma 5 (level 0.5 on sigma = 10 (1 - p)) sync their
    first 2 with w 20, 20 * 0.95^5. Counted from the schedule the same sigmas sync none (all past level 0.2), and
    located as steps 10.. of a 20-step schedule none either."""
    sigmas = [5.0 - 0.5 * i for i in range(10)] + [0.0]
    run, papers = SyncSchedule(20.0, 0.95, 10, start="run"), SyncSchedule(20.0, 0.95, 10)
    expected = [20.0, 20 * 0.95 ** 5] + [0.0] * 8
    assert run.step_weights(sigmas, level) == pytest.approx(expected, rel=1e-12)
    assert run.step_weights(sigmas, level, (10, 20)) == pytest.approx(expected, rel=1e-12)
    assert papers.step_weights(sigmas, level) == [0.0] * 10
    assert papers.step_weights(sigmas, level, (10, 20)) == [0.0] * 10
