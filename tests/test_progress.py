"""What the user sees while it runs: ComfyUI progress bars (read through ComfyUI's own global progress
hook, as the server's is) during synced steps, over the autoregressive order and in the Coherence
Report; Cancel honoured within one window's gradient pass."""
from __future__ import annotations

import contextlib

import pytest
import torch

from test_sync import WINDOW_STARTS, run, s, sync_settings  # noqa: F401  (s: the shared fixture)


@contextlib.contextmanager
def progress_calls():
    """Every update of every bar. ComfyUI 0.33's ProgressBar forwards an update to the hook only 0.1 s after the
    last one (first and final always): that interval is set to 0 here, so the test sees each update the pack
    makes, not how fast this machine runs."""
    import comfy.utils
    calls = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    interval = getattr(comfy.utils, "PROGRESS_THROTTLE_MIN_INTERVAL", None)
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: calls.append((value, total)))
    if interval is not None:
        comfy.utils.PROGRESS_THROTTLE_MIN_INTERVAL = 0.0
    try:
        yield calls
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        if interval is not None:
            comfy.utils.PROGRESS_THROTTLE_MIN_INTERVAL = interval


def test_synced_steps_move_a_bar_per_window(s):
    """3 steps with every step synced: each synced step's bar counts the 4 non-anchor windows, and the
    sampler's own bar counts the steps."""
    world = s.inference
    with progress_calls() as calls:
        run(s, world, sync_settings(s, world), steps=3)
    windows = len(WINDOW_STARTS) - 1
    per_window = [v for v, t in calls if t == windows]
    assert per_window == list(range(1, windows + 1)) * 3, calls
    assert [v for v, t in calls if t == 3] == [1, 2, 3]


def test_autoregressive_order_runs_under_one_bar(s):
    from controlsync.nodes.factor_graph_collage import FactorGraphCollage
    world = s.inference
    plan = FactorGraphCollage.execute("chain", 192, 64, 64, 64, 32, "horizontal", 0, order="autoregressive").args[0]
    with progress_calls() as calls:
        run(s, world, plan=plan, steps=2)
    factors = 5  # 192 px of 64 px factors overlapping by 32
    assert {t for _, t in calls} == {factors * 2}
    assert [v for v, _ in calls] == list(range(1, factors * 2 + 1))


def test_coherence_report_moves_a_bar_per_lpips_call(s):
    from controlsync.nodes.coherence_report import CoherenceReport
    with progress_calls() as calls:
        CoherenceReport.execute(torch.rand(2, 64, 192, 3), 64, "alex", s.plan)
    total = 2 * (len(WINDOW_STARTS) + 1)  # per image: every window's drift, then the crop pairs at once
    assert calls[-1] == (total, total) and [v for v, _ in calls] == list(range(1, total + 1))


def test_cancel_is_honoured_within_one_windows_gradient_pass(s):
    import comfy.model_management as mm
    world = s.inference
    passes = []

    def cancel_in_first_pass(executor, *args, **kwargs):
        if torch.is_grad_enabled():
            passes.append(1)
            mm.interrupt_current_processing(True)
        return executor(*args, **kwargs)
    model = world["model"].clone()
    model.add_wrapper_with_key(s.pe.WrappersMP.APPLY_MODEL, "test.cancel", cancel_in_first_pass)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            run(s, world, sync_settings(s, world), model=model)
    finally:
        mm.interrupt_current_processing(False)
    assert len(passes) == 1  # the next window's pass never started
