"""Window geometry, blend weights and merging: plain torch, no ComfyUI."""
import itertools

import pytest
import torch

from comfy_host import load_sampling

S = load_sampling()


@pytest.mark.parametrize("length,window,stride", [(64, 64, 8), (384, 64, 8), (100, 64, 16), (65, 64, 64), (200, 48, 48)])
def test_window_starts_cover_every_cell_and_last_is_flush(length, window, stride):
    starts = S.window_starts(length, window, stride)
    assert starts[0] == 0 and starts[-1] == length - window
    covered = torch.zeros(length, dtype=torch.int)
    for s in starts:
        covered[s:s + window] += 1
    assert bool((covered > 0).all())
    assert all(b - a <= stride for a, b in zip(starts, starts[1:]))


def test_window_plan_layout_1d_strip_and_2d_grid():
    strip = S.WindowPlan((512, 3072), (512, 512), (64, 64)).layout((64, 384), 8)
    assert len(strip.regions) == (384 - 64) // 8 + 1 == 41
    assert all(r.size == (64, 64) for r in strip.regions)
    grid = S.WindowPlan((1024, 1536), (512, 512), (256, 256)).layout((128, 192), 8)
    assert [r.rect[:2] for r in grid.regions] == [(y, x) for y in (0, 32, 64) for x in (0, 32, 64, 96, 128)]


def test_layout_converts_with_model_factor_and_multiple():
    plan = S.WindowPlan((512, 1024), (512, 512), (128, 128))
    at16 = plan.layout((32, 64), factor=16)
    assert at16.regions[0].size == (32, 32) and at16.regions[1].rect == (0, 8, 32, 32)
    rounded = S.WindowPlan((512, 1024), (504, 504), (8, 8)).layout((64, 128), 8, multiple=2)
    assert rounded.regions[0].size == (62, 62)


@pytest.mark.parametrize("anchor,index,expected", [("first", 0, 0), ("middle", 0, 20), ("index", 7, 7)])
def test_anchor_choice(anchor, index, expected):
    plan = S.WindowPlan((512, 3072), (512, 512), (64, 64), anchor, index).layout((64, 384), 8)
    assert plan.anchor == expected


@pytest.mark.parametrize("kwargs,needle", [
    (dict(canvas_px=(512, 3072), window_px=(512, 4096), stride_px=(64, 64)), "window_width = 4096 px is larger than the canvas width"),
    (dict(canvas_px=(512, 3072), window_px=(512, 516), stride_px=(64, 64)), "window_width must be a positive multiple of 8"),
    (dict(canvas_px=(512, 3070), window_px=(512, 512), stride_px=(64, 64)), "width must be a positive multiple of 8"),
    (dict(canvas_px=(512, 3072), window_px=(512, 512), stride_px=(576, 576)), "stride = 576 px is larger than window_height"),
    (dict(canvas_px=(512, 3072), window_px=(512, 512), stride_px=(64, 64), anchor="last"), "anchor must be one of"),
])
def test_bad_plans_name_the_input(kwargs, needle):
    with pytest.raises(S.PlanError, match=needle):
        S.WindowPlan(**kwargs)


def test_plan_for_another_canvas_is_refused():
    with pytest.raises(S.PlanError, match="made for a 3072x512 px canvas"):
        S.WindowPlan((512, 3072), (512, 512), (64, 64)).layout((64, 256), 8)


def test_anchor_index_past_last_window_is_refused():
    with pytest.raises(S.PlanError, match="anchor_index 99 is past the last window"):
        S.WindowPlan((512, 1024), (512, 512), (256, 256), "index", 99).layout((64, 128), 8)


def test_wrapped_region_gathers_and_scatters_across_the_edge():
    canvas = torch.arange(2 * 3 * 4 * 10, dtype=torch.float32).reshape(2, 3, 4, 10)
    region = S.rect_region(1, 8, 3, 5, canvas=(4, 10))
    got = S.gather(canvas, region)
    expected = canvas[..., [1, 2, 3], :][..., [8, 9, 0, 1, 2]]
    assert torch.equal(got, expected)
    back = torch.zeros_like(canvas)
    S.scatter_add(back, region, got)
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[1:4][:, [8, 9, 0, 1, 2]] = True
    assert torch.equal(back[..., mask], canvas[..., mask]) and not back[..., ~mask].any()


@pytest.mark.parametrize("feather", [0, 3, 8])
def test_blend_map_is_positive_and_symmetric(feather):
    m = S.blend_map((16, 24), feather)
    assert bool((m > 0).all()) and float(m.max()) == pytest.approx(min(1.0, 8 / (feather + 1)))
    assert torch.equal(m, m.flip(0)) and torch.equal(m, m.flip(1))
    if feather == 0:
        assert bool((m == 1).all())
    else:
        assert float(m[0, 0]) == pytest.approx(1 / (feather + 1))


@pytest.mark.parametrize("blend", ["uniform", "feather"])
def test_merge_equals_an_independent_weighted_average(blend):
    plan = S.WindowPlan((128, 320), (64, 128), (32, 64), blend=blend).layout((16, 40), 8)
    g = torch.Generator().manual_seed(0)
    preds = [torch.randn(2, 4, *r.size, generator=g) for r in plan.regions]
    merged = S.merge(plan, preds)
    # independent re-computation: loop over every cell and every window covering it
    num = torch.zeros(2, 4, 16, 40, dtype=torch.float64)
    den = torch.zeros(16, 40, dtype=torch.float64)
    ramp = plan.feather
    for (y, x, h, w), pred in zip((r.rect for r in plan.regions), preds):
        for i, j in itertools.product(range(h), range(w)):
            weight = 1.0 if ramp == 0 else min(1.0, (min(i, h - 1 - i, j, w - 1 - j) + 1) / (ramp + 1))
            num[..., y + i, x + j] += weight * pred[..., i, j].double()
            den[y + i, x + j] += weight
    assert torch.allclose(merged.double(), num / den, atol=1e-6)


def test_merger_order_and_batching_do_not_matter():
    plan = S.WindowPlan((64, 256), (64, 64), (32, 32)).layout((8, 32), 8)
    preds = [torch.randn(1, 4, 8, 8) for _ in plan.regions]
    m = S.Merger(plan, torch.zeros(1, 4, 8, 32))
    for i in reversed(range(len(preds))):
        m.add(i, preds[i])
    assert torch.allclose(m.result(), S.merge(plan, preds), atol=1e-6)


def test_one_window_merge_is_the_identity_bit_for_bit():
    plan = S.WindowPlan((64, 256), (64, 256), (8, 8)).layout((8, 32), 8)
    pred = torch.randn(1, 4, 8, 32)
    assert torch.equal(S.merge(plan, [pred]), pred)


def test_uncovered_cells_are_refused():
    region = S.rect_region(0, 0, 4, 4)
    plan = S.RegionPlan((4, 8), (region,), (1.0,))
    with pytest.raises(ValueError, match="without weight"):
        S.merge(plan, [torch.zeros(1, 1, 4, 4)])


def test_sampling_package_does_not_import_comfyui():
    """In a fresh interpreter: loading every sampling module imports no ComfyUI module."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from comfy_host import load_sampling; load_sampling(); "
            "import importlib, pkgutil, controlsync_sampling as p; "
            "[importlib.import_module('controlsync_sampling.' + m.name) for m in pkgutil.iter_modules(p.__path__)]; "
            "bad = [n for n in sys.modules if n == 'comfy' or n.startswith(('comfy.', 'comfy_api', 'folder_paths'))]; "
            "print('comfy modules:', bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
