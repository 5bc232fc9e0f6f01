"""360 cubemaps: cube geometry, the hierarchical factor graph and equirectangular conversion (plain torch)."""
import math

import pytest
import torch

from comfy_host import load_sampling

S = load_sampling()
from controlsync_sampling import cubemap as cm  # noqa: E402
from controlsync_sampling.collage import FactorGraphPlan  # noqa: E402


def strip_of_ids(size):
    return torch.arange(size * 6 * size, dtype=torch.float64).view(size, 6 * size)


def test_faces_continue_across_every_cube_edge():
    """A face grown by one cell shows, in its margin, exactly the neighbouring face's edge cells."""
    size = 5
    ids = strip_of_ids(size)
    padded = cm.pad_faces(ids, 1)
    face = lambda f: ids[:, f * size:(f + 1) * size]  # noqa: E731
    for f in range(6):
        assert torch.equal(padded[f][1:-1, 1:-1], face(f))
    L, F, R, B, U, D = range(6)
    # the horizon ring continues left to right; up meets front's top row, down its bottom row
    assert torch.equal(padded[F][1:-1, -1], face(R)[:, 0]) and torch.equal(padded[F][1:-1, 0], face(L)[:, -1])
    assert torch.equal(padded[B][1:-1, -1], face(L)[:, 0])
    assert torch.equal(padded[F][0, 1:-1], face(U)[-1]) and torch.equal(padded[F][-1, 1:-1], face(D)[0])
    # margins show only faces' edge cells, each once, except the 4 corner cells of each face (on two edges)
    seen = torch.cat([torch.cat([p[0, 1:-1], p[-1, 1:-1], p[1:-1, 0], p[1:-1, -1]]) for p in padded])
    edge = torch.zeros(size, size, dtype=torch.bool)
    edge[0], edge[-1], edge[:, 0], edge[:, -1] = True, True, True, True
    edge_ids = set(torch.cat([face(f)[edge] for f in range(6)]).tolist())
    assert set(seen.tolist()) == edge_ids and len(seen) == len(edge_ids) + 24


@pytest.mark.parametrize("ring", list(cm.RINGS))
def test_each_loop_is_a_seamless_strip_of_four_faces(ring):
    """Laid out with their quarter turns, each face's right margin is the next face's left column,
    around the whole loop (the last back to the first)."""
    size = 4
    ids = strip_of_ids(size)
    padded = cm.pad_faces(ids, 1)
    faces = cm.RINGS[ring]
    for (f, k), (g, kg) in zip(faces, faces[1:] + faces[:1]):
        right_margin = torch.rot90(padded[f], k, dims=(0, 1))[1:-1, -1]
        next_left = torch.rot90(ids[:, g * size:(g + 1) * size], kg, dims=(0, 1))[:, 0]
        assert torch.equal(right_margin, next_left)


def test_each_face_is_shared_by_its_two_loops_with_weights_summing_to_one():
    """The cube decode blends each face from its two loops; at the edges a loop crosses it takes all."""
    n = 6
    for f in range(6):
        shares = [torch.rot90(cm.crossing_weight(n, torch.float64), -k, dims=(0, 1))
                  for ring in cm.RINGS.values() for g, k in ring if g == f]
        assert len(shares) == 2
        assert torch.allclose(shares[0] + shares[1], torch.ones(n, n, dtype=torch.float64), atol=1e-12)
        for s in shares:  # each loop owns one pair of opposite edges outright
            edges = (s[1:-1, 0], s[1:-1, -1], s[0, 1:-1], s[-1, 1:-1])
            owned = [bool((e == 1).all()) for e in edges]
            assert owned in ([True, True, False, False], [False, False, True, True])


@pytest.mark.parametrize("face,window,overlap", [(8, 8, 4), (8, 16, 8), (16, 8, 4), (8, 12, 4), (64, 48, 16), (64, 64, 32)])
def test_cubemap_coefficients_sum_to_one_and_merge_is_consistent(face, window, overlap):
    plan = cm.cubemap_plan(face, window, overlap)
    total = torch.zeros(plan.canvas, dtype=torch.float64)
    for region, c in zip(plan.regions, plan.coefficients):
        S.scatter_add(total, region, torch.full(region.size, c, dtype=torch.float64))
    assert plan.canvas == (face, 6 * face)
    assert torch.equal(total, torch.ones_like(total))
    # regions that all see one canvas give back that canvas: every turned piece goes back where it came from
    x = torch.randn(2, 3, *plan.canvas, dtype=torch.float64)
    assert torch.allclose(S.merge(plan, [S.gather(x, r) for r in plan.regions]), x, atol=1e-12)
    assert len(set(plan.regions)) == len(plan.regions)  # coinciding regions were merged
    assert any(p.turns for r in plan.regions for p in r.pieces)


def test_papers_cubemap_graph_counts():
    """Face-sized windows at half overlap: 8 windows and 8 half-face overlaps per loop; the windows lying
    exactly on a face as a face pair sees it (unturned) cancel against that pair's -1 (and leave the plan,
    except the anchor)."""
    plan = cm.cubemap_plan(64, 64, 32)
    windows = [r for r, c in zip(plan.regions, plan.coefficients) if c > 0]
    halves = [r for r in plan.regions if r.size == (64, 32)]
    assert len(windows) == 24 - 5 and len(halves) == 24
    # the default anchor, window 0 (the left face), is one that cancels: it stays, at coefficient 0
    assert plan.factors_of[plan.anchor] == (plan.anchor,) and plan.coefficients[plan.anchor] == 0
    assert plan.regions[plan.anchor].rect == (0, 0, 64, 64)
    assert len(plan.regions) == 19 + 1 + 24 + 1  # windows, the anchor, half-face overlaps, the up face


def test_cubemap_region_pieces_are_views_of_the_cube():
    """A window straddling two faces of a loop, gathered from the strip, is the loop's strip there."""
    size = 4
    ids = strip_of_ids(size)
    for ring, faces in cm.RINGS.items():
        ring_strip = torch.cat([torch.rot90(ids[:, f * size:(f + 1) * size], k, dims=(0, 1)) for f, k in faces], dim=1)
        for x in range(0, 4 * size, 2):
            box = S.rect_region(0, x, size, size, (size, 4 * size))
            region = cm._on_cube(ring, size, box)
            assert torch.equal(S.gather(ids, region), S.gather(ring_strip, box))


def test_equirectangular_round_trip():
    size = 32
    c = cm._cell_centres(size, size)
    v, u = torch.meshgrid(c, c, indexing="ij")
    strip = torch.cat([(lambda d: (d / d.norm(dim=-1, keepdim=True)).movedim(-1, 0))(cm.face_direction(f, u, v))
                       for f in range(6)], dim=-1).float()
    eq = cm.cube_to_equirect(strip[None])[0]
    h = eq.shape[-2]
    lat = math.pi / 2 - (torch.arange(h) + 0.5) / h * math.pi
    lon = (torch.arange(2 * h) + 0.5) / (2 * h) * 2 * math.pi - math.pi
    lat, lon = torch.meshgrid(lat, lon, indexing="ij")
    truth = torch.stack([lat.cos() * lon.sin(), lat.sin(), lat.cos() * lon.cos()])
    assert eq.shape == (3, 64, 128)
    err_eq = (eq - truth).abs().max().item()
    err_cube = (cm.equirect_to_cube(truth.float()[None], size)[0] - strip).abs().max().item()
    print(f"[cubemap] direction field: cube -> equirect max error {err_eq:.1e}, equirect -> cube {err_cube:.1e}")
    assert err_eq < 1e-2 and err_cube < 2e-3
    # front at the centre, up at the top
    assert eq[2, 32, 64] > 0.99 and eq[1, 0, 5] > 0.99


@pytest.mark.parametrize("kwargs,needle", [
    (dict(canvas_px=(512, 2048)), "strip of 6 square faces"),
    (dict(window_px=(256, 512)), "window_height must equal the face size"),
    (dict(window_px=(512, 384), overlap_px=64), "whole number, at least 3, of window - overlap"),
    (dict(anchor=30), "anchor 30 is past the last window"),
    (dict(overlap_px=0), "not one connected graph"),
])
def test_bad_cubemaps(kwargs, needle):
    args = dict(graph="cubemap", canvas_px=(512, 3072), window_px=(512, 512), overlap_px=256) | kwargs
    with pytest.raises(S.PlanError, match=needle):
        FactorGraphPlan(**args).layout(tuple(v // 8 for v in args["canvas_px"]), 8)


def test_face_prompts_follow_the_faces():
    prompts = [torch.full((1, 2, 3), float(f)) for f in range(6)]
    plan = FactorGraphPlan("cubemap", (64, 384), (64, 64), 32, factor_prompts=tuple(prompts)).layout((8, 48), 8)
    for index, region in enumerate(plan.regions):
        faces = cm.face_cells(plan, index)
        assert torch.equal(plan.prompts[index], torch.full((1, 2, 3), sum(faces) / len(faces)))
    with pytest.raises(S.PlanError, match="one prompt per face"):
        FactorGraphPlan("cubemap", (64, 384), (64, 64), 32, factor_prompts=tuple(prompts[:5])).layout((8, 48), 8)


# ---------------------------------------------------------------------------------------------------------------
# Layouts other 360 tools use, against pytorch360convert / py360convert (test-only dependencies, installed by
# .ci/run): the same faces must land in the same places, and the projections must agree.

def _reference(name):
    import importlib
    import os
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{name} is missing under CI: .ci/run installs it")
        pytest.skip(f"{name} not installed (pip install {name})")


def smooth_sphere_field(directions: torch.Tensor) -> torch.Tensor:
    """Three smooth, direction-dependent channels (..., 3) -> (3, ...): every face looks different, and
    neighbouring pixels differ little, so bilinear sampling conventions agree to ~1e-2."""
    d = directions / directions.norm(dim=-1, keepdim=True)
    x, y, z = d.unbind(-1)
    return torch.stack([0.5 + 0.4 * x, 0.5 + 0.3 * y + 0.1 * x * z, 0.5 + 0.4 * z - 0.1 * y * y])


def equirect_of_field(height: int) -> torch.Tensor:
    """(3, height, 2 height) equirectangular image of the field, longitude -pi..pi left to right (pixel centres)."""
    lat = math.pi / 2 - (torch.arange(height, dtype=torch.float64) + 0.5) / height * math.pi
    lon = (torch.arange(2 * height, dtype=torch.float64) + 0.5) / (2 * height) * 2 * math.pi - math.pi
    lat, lon = torch.meshgrid(lat, lon, indexing="ij")
    return smooth_sphere_field(torch.stack([lat.cos() * lon.sin(), lat.sin(), lat.cos() * lon.cos()], -1))


def test_layouts_place_the_faces_as_pytorch360convert_does():
    """Faces of distinct ids: our strip rearranged as 'horizon', 'dice' and 'faces' equals pytorch360convert's
    own rearrangement of the same faces (cube_list2h / cube_h2dice / cube_h2list), and converts back exactly."""
    p3c = _reference("pytorch360convert")
    size = 4
    ids = torch.arange(3 * size * 6 * size, dtype=torch.float64).view(3, size, 6 * size)  # (C, S, 6S): our strip
    ours = dict(zip(cm.FACES, ids.split(size, dim=-1)))
    theirs = [ours[name].permute(1, 2, 0) for name in ("front", "right", "back", "left", "up", "down")]  # HWC
    horizon = p3c.cube_list2h(theirs)
    strip = ids[None]
    assert torch.equal(cm.convert_cube_layout(strip, "strip", "horizon")[0], horizon.permute(2, 0, 1))
    assert torch.equal(cm.convert_cube_layout(strip, "strip", "dice")[0], p3c.cube_h2dice(horizon).permute(2, 0, 1))
    faces = cm.convert_cube_layout(strip, "strip", "faces")
    assert faces.shape == (6, 3, size, size)
    assert all(torch.equal(f.permute(1, 2, 0), t) for f, t in zip(faces, p3c.cube_h2list(horizon)))
    for layout in cm.LAYOUTS:
        there = cm.convert_cube_layout(strip, "strip", layout)
        for other in cm.LAYOUTS:
            assert torch.equal(cm.convert_cube_layout(cm.convert_cube_layout(there, layout, other), other, "strip"), strip)


def test_cube_faces_match_pytorch360convert_projection():
    """An equirectangular image of a smooth field turned into cube faces by our projection and by
    pytorch360convert's e2c (horizon layout) agree: same faces, same orientation (a wrong face or a flip
    would be off by ~0.3)."""
    p3c = _reference("pytorch360convert")
    size = 32
    equi = equirect_of_field(64)
    ours = cm.convert_cube_layout(cm.equirect_to_cube(equi[None], size), "strip", "horizon")[0]
    theirs = p3c.e2c(equi.float(), face_w=size, cube_format="horizon").double()
    err = (ours - theirs).abs()
    assert err.max() < 0.03, f"max difference {err.max():.4f}"


@pytest.mark.parametrize("layout", ["horizon", "dice"])
def test_equirectangular_matches_pytorch360convert_and_py360convert(layout):
    """A cubemap of the smooth field in another tool's layout -> our Cubemap to Equirectangular path
    (layout -> strip -> equirect) agrees with pytorch360convert's c2e and py360convert's c2e: 2:1, front at
    the centre, the seam (longitude +-180 degrees) at the left and right edges, i.e. the back."""
    p3c = _reference("pytorch360convert")
    p360 = _reference("py360convert")
    import numpy as np
    size = 32
    c = cm._cell_centres(size, size)
    v, u = torch.meshgrid(c, c, indexing="ij")
    strip = torch.cat([smooth_sphere_field(cm.face_direction(f, u, v)) for f in range(6)], dim=-1)  # (3, S, 6S)
    given = cm.convert_cube_layout(strip[None], "strip", layout)[0]
    ours = cm.cube_to_equirect(cm.convert_cube_layout(given[None], layout, "strip"), 64)[0]
    assert ours.shape == (3, 64, 128)
    theirs = p3c.c2e(given.float(), h=64, w=128, cube_format=layout).double()
    numpy_ref = torch.from_numpy(np.ascontiguousarray(
        p360.c2e(given.permute(1, 2, 0).numpy(), 64, 128, cube_format=layout))).permute(2, 0, 1)
    # Measured: both libraries put their equirectangular pixels half a pixel off ours (linspace over the
    # edges, not pixel centres): ~0.012 mean, 0.022 at the 99th percentile; pytorch360convert also has one
    # pixel of 8192 on a wrong face (0.59, its own face-type rounding: 0.59 from the exact field too). A
    # misplaced or flipped face would be ~0.3 over a whole face (1/8 of the pixels).
    for name, ref in (("pytorch360convert", theirs), ("py360convert", numpy_ref)):
        err = (ours - ref).abs().amax(0)
        assert err.quantile(0.99) < 0.03 and (err > 0.05).float().mean() < 0.001, \
            f"{name}: 99th percentile {err.quantile(0.99):.4f}, {(err > 0.05).float().mean():.2%} of pixels off by > 0.05"
    # and the field itself (measured: 1.8e-3 at most): front (z = +1, channel 2 high) at the centre column,
    # back at both edges, up at the top
    assert (ours - equirect_of_field(64)).abs().max() < 0.005
    centre, edge = ours[2, 32, 64], ours[2, 32, 0]
    assert centre > 0.85 and edge < 0.15


@pytest.mark.parametrize("layout,shape,needle", [
    ("strip", (1, 3, 8, 40), "6 times as wide"),
    ("dice", (1, 3, 8, 16), "4 faces wide and 3 high"),
    ("faces", (4, 3, 8, 8), "batch of 6"),
    ("sideways", (1, 3, 8, 48), "unknown cubemap layout"),
])
def test_bad_layouts_are_refused(layout, shape, needle):
    with pytest.raises(S.PlanError, match=needle):
        cm.cube_faces(torch.zeros(shape), layout)


# --- the anchor the user chose, and which windows contain each region --------------------------

def ring_windows(size, window, overlap):
    """Every window of the three loops, loop by loop, as the (size, window) block of cube-strip cell ids
    the loop shows there (turns included), built here from the loops' face order and quarter turns."""
    ids = strip_of_ids(size)
    step, out = window - overlap, []
    for faces in cm.RINGS.values():
        ring = torch.cat([torch.rot90(ids[:, f * size:(f + 1) * size], k, dims=(0, 1)) for f, k in faces], dim=1)
        for k in range(4 * size // step):
            out.append(ring[:, [(k * step + i) % (4 * size) for i in range(window)]])
    return out


@pytest.mark.parametrize("face,window,overlap", [(8, 8, 4), (8, 16, 8), (16, 8, 4)])
def test_cubemap_anchor_is_exactly_the_chosen_window(face, window, overlap):
    """Every anchor index gives the window the user chose (cells and orientation), also a window that
    cancels out of the merge (face-sized windows on a face, as the default anchor 0): it stays in the plan
    at coefficient 0, and the merge itself does not depend on the anchor."""
    ids = strip_of_ids(face)
    windows = ring_windows(face, window, overlap)
    merges = set()
    cancelled = 0
    for anchor in range(len(windows)):
        plan = cm.cubemap_plan(face, window, overlap, anchor)
        assert torch.equal(S.gather(ids, plan.regions[plan.anchor]), windows[anchor])
        assert plan.factors_of[plan.anchor] == (plan.anchor,)
        cancelled += plan.coefficients[plan.anchor] == 0
        merges.add(frozenset((r, c) for r, c in zip(plan.regions, plan.coefficients) if c != 0))
        total = torch.zeros(plan.canvas, dtype=torch.float64)
        for region, c in zip(plan.regions, plan.coefficients):
            S.scatter_add(total, region, torch.full(region.size, c, dtype=torch.float64))
        assert torch.equal(total, torch.ones_like(total))
    assert len(merges) == 1
    # face-sized windows: the 4 LFRB windows on a face and the unturned ULDR window on the down face cancel
    assert cancelled == (5 if window == face else 0)


@pytest.mark.parametrize("face,window,overlap", [(8, 8, 4), (8, 16, 8), (16, 8, 4)])
def test_cubemap_factors_of_lists_the_windows_containing_each_region(face, window, overlap):
    """factors_of: (i,) for every window region; for every other region, exactly the window regions whose
    cube cells hold all of its cells (checked on a strip of cell ids, turned pieces and all)."""
    ids = strip_of_ids(face)
    window_blocks = ring_windows(face, window, overlap)
    plan = cm.cubemap_plan(face, window, overlap, 0)
    seen = [S.gather(ids, r) for r in plan.regions]
    is_window = [any(b.shape == s.shape and torch.equal(b, s) for b in window_blocks) for s in seen]
    cells = [set(s.flatten().tolist()) for s in seen]
    for i in range(len(plan.regions)):
        expected = (i,) if is_window[i] else tuple(j for j in range(len(plan.regions))
                                                   if is_window[j] and cells[i] <= cells[j])
        assert plan.factors_of[i] == expected, i
        if not is_window[i] and plan.regions[i].size[1] < window:  # loop overlaps: inside their two windows at least
            assert len(expected) >= 2
    assert sum(is_window) == sum(1 for i, f in enumerate(plan.factors_of) if f == (i,))
