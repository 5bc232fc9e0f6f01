"""DiffCollage factor graphs: coefficients, and exactness on a Gaussian Markov chain (plain torch)."""
import math

import pytest
import torch

from comfy_host import load_sampling

S = load_sampling()
from controlsync_sampling.collage import FactorGraphPlan  # noqa: E402


def coefficient_sums(plan):
    total = torch.zeros(plan.canvas, dtype=torch.float64)
    for region, c in zip(plan.regions, plan.coefficients):
        S.scatter_add(total, region, torch.full(region.size, c, dtype=torch.float64))
    return total


@pytest.mark.parametrize("graph,canvas,window,overlap,direction", [
    ("chain", (64, 384), (64, 64), 32, "horizontal"), ("chain", (64, 400), (64, 64), 32, "horizontal"),
    ("chain", (384, 64), (64, 64), 16, "vertical"), ("chain", (64, 64), (64, 64), 0, "horizontal"),
    ("cycle", (64, 384), (64, 64), 32, "horizontal"), ("cycle", (32, 240), (32, 64), 24, "horizontal"),
    ("grid", (192, 256), (64, 64), 32, "horizontal"), ("grid", (200, 136), (64, 64), 16, "horizontal"),
])
def test_coefficients_sum_to_one_on_every_cell(graph, canvas, window, overlap, direction):
    plan = FactorGraphPlan(graph, tuple(8 * v for v in canvas), tuple(8 * v for v in window), 8 * overlap,
                           direction).layout(canvas, 8)
    assert torch.equal(coefficient_sums(plan), torch.ones(canvas, dtype=torch.float64))
    if graph != "grid" and overlap:
        # Bethe on chains and cycles: factors +1, each overlap -(deg - 1) = -1
        assert sorted(set(plan.coefficients)) == [-1.0, 1.0]
    if graph == "cycle":
        assert any(len(r.pieces) > 1 for r in plan.regions)  # the loop closes across the canvas edge


def test_half_overlap_chain_is_the_papers_graph():
    plan = FactorGraphPlan("chain", (512, 2048), (512, 512), 256).layout((64, 256), 8)
    factors = [r.rect for r, c in zip(plan.regions, plan.coefficients) if c == 1]
    variables = [r.rect for r, c in zip(plan.regions, plan.coefficients) if c == -1]
    assert factors == [(0, 32 * k, 64, 64) for k in range(7)]
    assert variables == [(0, 32 * k, 64, 32) for k in range(1, 7)]


def test_one_factor_graph_is_one_window():
    plan = FactorGraphPlan("chain", (512, 512), (512, 512), 0).layout((64, 64), 8)
    assert len(plan.regions) == 1 and plan.coefficients == (1.0,)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(graph="chain", canvas_px=(512, 384), window_px=(512, 512), overlap_px=256), "larger than the canvas"),
    (dict(graph="chain", canvas_px=(512, 2048), window_px=(512, 512), overlap_px=512), "must be smaller than the window"),
    (dict(graph="cycle", canvas_px=(512, 2000), window_px=(512, 512), overlap_px=256), None),
    (dict(graph="tree", canvas_px=(512, 2048), window_px=(512, 512), overlap_px=256), "graph must be one of"),
    (dict(graph="chain", canvas_px=(512, 2048), window_px=(512, 512), overlap_px=0), "not one connected graph"),
])
def test_bad_graphs(kwargs, needle):
    if needle is None:
        with pytest.raises(S.PlanError, match="multiple of window - overlap"):
            FactorGraphPlan(**kwargs).layout((64, 250), 8)
    else:
        with pytest.raises(S.PlanError, match=needle):
            FactorGraphPlan(**kwargs).layout(tuple(v // 8 for v in kwargs["canvas_px"]), 8)


# --- exactness on a Gaussian Markov chain --------------------------------------------------------

# correlation length ~1.4 cells, well inside the 4-cell overlap (at RHO 0.9 the noised marginals'
# longer memory leaves DiffCollage ~20% off, averaging ~37%)
L, WINDOW, OVERLAP, RHO = 16, 8, 4, 0.5
COV = torch.tensor([[RHO ** abs(i - j) for j in range(L)] for i in range(L)], dtype=torch.float64)


def exact_denoiser(cov):
    """E[x0 | x0 + sigma n] for x0 ~ N(0, cov): cov (cov + sigma^2 I)^-1 x."""
    def denoise(x, sigma):
        eye = torch.eye(cov.shape[0], dtype=cov.dtype)
        return x @ torch.linalg.solve(cov + sigma ** 2 * eye, cov)  # symmetric: (A^-1 C)^T = C A^-1
    return denoise


def region_indices(region):
    x, w = region.pieces[0].src[1], region.pieces[0].size[1]
    return list(range(x, x + w))


def merged_denoiser(plan):
    """The plan's merge of each region's exact (marginal) denoiser: the sampler's own merge code."""
    parts = [(region_indices(r), exact_denoiser(COV[region_indices(r)][:, region_indices(r)])) for r in plan.regions]

    def denoise(x, sigma):
        preds = [d(x[:, idx], sigma)[:, None, None, :] for idx, d in parts]
        return S.merge(plan, preds)[:, 0, 0, :]
    return denoise


def plans():
    collage = FactorGraphPlan("chain", (8, 8 * L), (8, 8 * WINDOW), 8 * OVERLAP).layout((1, L), 8)
    averaging = S.RegionPlan((1, L), tuple(r for r, c in zip(collage.regions, collage.coefficients) if c > 0),
                             tuple(1.0 for c in collage.coefficients if c > 0))
    return collage, averaging


def test_factor_graph_score_converges_to_the_exact_score_as_sigma_goes_to_zero():
    collage, averaging = plans()
    exact = exact_denoiser(COV)
    g = torch.Generator().manual_seed(0)
    errors = {}
    for sigma in (4.0, 1.0, 0.25, 0.0625, 0.015625):
        x = torch.randn(256, L, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(COV + sigma ** 2 * torch.eye(L, dtype=torch.float64)).T
        truth = exact(x, sigma)
        # score = (D - x) / sigma^2: compare scores, relative to the exact score's size
        score = lambda d: (d - x) / sigma ** 2  # noqa: E731
        rel = lambda d: float((score(d) - score(truth)).norm() / score(truth).norm())  # noqa: E731
        errors[sigma] = (rel(merged_denoiser(collage)(x, sigma)), rel(merged_denoiser(averaging)(x, sigma)))
    print("[collage] relative score error vs sigma (DiffCollage, averaging): "
          + ", ".join(f"{s:g}: {a:.1e} / {b:.1e}" for s, (a, b) in errors.items()))
    collage_errors = [a for s, (a, _) in errors.items() if s <= 1.0]
    assert all(later < earlier for earlier, later in zip(collage_errors, collage_errors[1:]))
    assert collage_errors[-1] < 1e-3 and errors[0.015625][1] > 10 * collage_errors[-1]


def schedule(steps=200, sigma_max=40.0):
    return torch.cat([torch.exp(torch.linspace(math.log(sigma_max), math.log(1e-3), steps, dtype=torch.float64)),
                      torch.zeros(1, dtype=torch.float64)])


def euler_sample(denoise, n, seed=0):
    sigmas = schedule()
    x = torch.randn(n, L, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * (x - denoise(x, float(s))) / s
    return x


def euler_covariance(denoise):
    """The exact covariance of euler_sample's output: with linear denoisers each step is x -> x T,
    so the covariance propagates as T^T C T (no Monte Carlo noise)."""
    sigmas = schedule()
    eye = torch.eye(L, dtype=torch.float64)
    cov = eye * sigmas[0] ** 2
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        step = eye + (s_next - s) / s * (eye - denoise(eye, float(s)))
        cov = step.T @ cov @ step
    return cov


def test_sampling_with_the_factor_graph_reproduces_the_chains_covariance():
    collage, averaging = plans()
    n = 4000
    exact, sampled = {}, {}
    for name, plan in (("DiffCollage", collage), ("averaging", averaging)):
        denoise = merged_denoiser(plan)
        exact[name] = float((euler_covariance(denoise) - COV).norm() / COV.norm())
        samples = euler_sample(denoise, n)
        sampled[name] = float((samples.T @ samples / n - COV).norm() / COV.norm())
    # Monte Carlo floor of a sample covariance: E|S - C|^2 = (tr(C)^2 + |C|^2) / n
    floor = math.sqrt((float(COV.trace()) ** 2 + float(COV.norm()) ** 2) / n) / float(COV.norm())
    print(f"[collage] relative covariance error (Frobenius), exact / {n} sampled chains (Monte Carlo floor {floor:.3f}): "
          f"DiffCollage {exact['DiffCollage']:.3f} / {sampled['DiffCollage']:.3f}, "
          f"averaging (MultiDiffusion) {exact['averaging']:.3f} / {sampled['averaging']:.3f}")
    assert exact["DiffCollage"] < 0.04 and exact["averaging"] > 3 * exact["DiffCollage"]
    assert sampled["DiffCollage"] < exact["DiffCollage"] + 2 * floor
    assert sampled["averaging"] > 1.5 * sampled["DiffCollage"]


def test_slerp_endpoints_and_path():
    from controlsync_sampling.conditioning import along_chain, slerp
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(1, 77, 64, generator=g) for _ in range(3))
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    a_unit, b_unit = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    mid = slerp(a_unit, b_unit, 0.5)
    a, b = a_unit, b_unit
    # on the great circle: the angle to each end is half the angle between the ends
    def angle(u, v):
        return torch.arccos((u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1)))
    assert torch.allclose(angle(a, mid), angle(a, b) / 2, atol=1e-4) and torch.allclose(angle(mid, b), angle(a, b) / 2, atol=1e-4)
    assert torch.allclose(mid.norm(dim=-1), torch.ones(1, 77), atol=1e-5)
    path = along_chain([a, b, c], 5)
    assert torch.equal(path[0], a) and torch.equal(path[2], b) and torch.equal(path[4], c)


def test_prompt_count_must_match_the_factors():
    g = torch.Generator().manual_seed(0)
    prompts = tuple(torch.randn(1, 77, 64, generator=g) for _ in range(3))
    plan = FactorGraphPlan("chain", (512, 2048), (512, 512), 256, factor_prompts=prompts)
    with pytest.raises(S.PlanError, match="3 prompts for 7 factors"):
        plan.layout((64, 256), 8)


# --- the paper's grid: factors meeting only at their corners -------------------------------------

def region_cells(region):
    """Canvas cells of a region, computed here from its pieces."""
    return {(p.src[0] + i, p.src[1] + j) for p in region.pieces for i in range(p.size[0]) for j in range(p.size[1])}


@pytest.mark.parametrize("canvas,window", [((12, 12), 4), ((8, 16), 4), ((16, 24), 8), ((8, 8), 8)])
def test_corner_grid_is_the_papers_grid(canvas, window):
    """DiffCollage Sec. 4.1: "each factor is an image patch that overlaps with 4 other factors at the 4 corners.
    Each overlapping region is a variable ... each variable node is connected to 2 factors". Here: one tiling at
    multiples of the window and one shifted by half a window both ways (where it fits), in reading order; the
    variables are exactly the corner quarters where two factors meet, each in exactly 2 factors (+1 each, -1 each
    quarter); interior factors meet 4 others; the coefficients sum to 1 on every cell."""
    H, W = canvas
    a, q = window, window // 2
    plan = FactorGraphPlan("corner_grid", (8 * H, 8 * W), (8 * a, 8 * a), 8 * q).layout(canvas, 8)
    tiling = [(y, x) for y in range(0, H, a) for x in range(0, W, a)]
    shifted = [(y, x) for y in range(q, H - a + 1, a) for x in range(q, W - a + 1, a)]
    expected_factors = sorted(tiling + shifted)
    factors = [i for i, f in enumerate(plan.factors_of) if f == (i,)]
    assert [plan.regions[i].rect for i in factors] == [(y, x, a, a) for y, x in expected_factors]
    assert all(plan.coefficients[i] == 1.0 for i in factors)
    cells = [region_cells(r) for r in plan.regions]
    meetings = {}
    for i in factors:
        for j in factors:
            if i < j and cells[i] & cells[j]:
                meetings[(i, j)] = cells[i] & cells[j]
    variables = [i for i in range(len(plan.regions)) if i not in factors]
    # every pair of factors that shares cells shares one a/2 x a/2 corner quarter, and that quarter is a variable
    assert sorted(frozenset(m) for m in meetings.values()) == sorted(frozenset(cells[v]) for v in variables)
    for v in variables:
        holders = [i for i in factors if cells[v] <= cells[i]]
        assert len(holders) == 2 and plan.factors_of[v] == tuple(holders)  # degree 2
        assert plan.coefficients[v] == -1.0 and plan.regions[v].size == (q, q)
    for i in factors:  # a factor away from the canvas edges meets 4 others, at its 4 corners
        y, x, _, _ = plan.regions[i].rect
        if q <= y and y + a <= H - q and q <= x and x + a <= W - q:
            assert sum(i in pair for pair in meetings) == 4
    assert torch.equal(coefficient_sums(plan), torch.ones(canvas, dtype=torch.float64))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(window_px=(512, 256), overlap_px=128), "corner_grid .*window_width = window_height = 2 x overlap"),
    (dict(overlap_px=128), "corner_grid .*window_width = window_height = 2 x overlap"),
    (dict(canvas_px=(1024, 1280)), "width must be a multiple of the window \\(512 px\\): e.g. 1024"),
    (dict(canvas_px=(768, 1024)), "height must be a multiple of the window"),
    (dict(canvas_px=(512, 2048)), "at least 2 windows each way .* use chain"),
])
def test_bad_corner_grids(kwargs, needle):
    args = dict(graph="corner_grid", canvas_px=(1024, 1536), window_px=(512, 512), overlap_px=256) | kwargs
    with pytest.raises(S.PlanError, match=needle):
        FactorGraphPlan(**args).layout(tuple(v // 8 for v in args["canvas_px"]), 8)


# a 2-D Gaussian field: separable AR(1) x AR(1) (a Gaussian Markov random field on the 8-neighbourhood)
FIELD, FIELD_WINDOW, FIELD_RHO = 12, 4, 0.5


def field_covariance():
    ar = torch.tensor([[FIELD_RHO ** abs(i - j) for j in range(FIELD)] for i in range(FIELD)], dtype=torch.float64)
    return torch.kron(ar, ar)  # cell (y, x) is index y * FIELD + x


def field_merged_denoiser(plan, cov):
    """The plan's merge (the sampler's own) of every region's exact marginal denoiser on the flattened field."""
    parts = []
    for r in plan.regions:
        idx = [y * FIELD + x for y, x in sorted(region_cells(r))]
        parts.append((idx, exact_denoiser(cov[idx][:, idx]), r.size))

    def denoise(x, sigma):
        preds = [d(x[:, idx], sigma).view(x.shape[0], 1, *size) for idx, d, size in parts]
        return S.merge(plan, preds).reshape(x.shape[0], -1)
    return denoise


def field_plans():
    def averaging(plan):
        keep = [i for i, f in enumerate(plan.factors_of) if f == (i,)]
        return S.RegionPlan(plan.canvas, tuple(plan.regions[i] for i in keep), tuple(1.0 for _ in keep))
    px = (8 * FIELD, 8 * FIELD)
    corner = FactorGraphPlan("corner_grid", px, (8 * FIELD_WINDOW,) * 2, 4 * FIELD_WINDOW).layout((FIELD, FIELD), 8)
    kikuchi = FactorGraphPlan("grid", px, (8 * FIELD_WINDOW,) * 2, 4 * FIELD_WINDOW).layout((FIELD, FIELD), 8)
    return {"corner grid (paper)": corner, "Kikuchi grid": kikuchi,
            "averaging corner-grid windows": averaging(corner), "averaging Kikuchi windows": averaging(kikuchi)}


def test_corner_grid_on_a_gaussian_field_against_the_exact_score():
    """Exact noised score of a 12x12 Gaussian field vs the paper's grid, the Kikuchi grid (half-window overlaps on
    all sides) and plain averaging. The paper's grid has cycles (Bethe is not exact there) and leaves neighbouring
    windows along the canvas edges joined by no factor: it is an approximation, measured here, clearly better than
    averaging the same windows away from the edges; the Kikuchi grid converges to the exact score."""
    cov = field_covariance()
    n = FIELD * FIELD
    plans = field_plans()
    exact = exact_denoiser(cov)
    interior = [y * FIELD + x for y in range(FIELD) for x in range(FIELD)
                if FIELD_WINDOW // 2 <= min(y, x, FIELD - 1 - y, FIELD - 1 - x)]
    g = torch.Generator().manual_seed(0)
    errors = {}
    for sigma in (1.0, 0.25, 1 / 64):
        x = torch.randn(256, n, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(
            cov + sigma ** 2 * torch.eye(n, dtype=torch.float64)).T
        truth = (exact(x, sigma) - x) / sigma ** 2
        for name, plan in plans.items():
            score = (field_merged_denoiser(plan, cov)(x, sigma) - x) / sigma ** 2
            errors[name, sigma] = (float((score - truth).norm() / truth.norm()),
                                   float((score - truth)[:, interior].norm() / truth[:, interior].norm()))
    for name in plans:
        print(f"[collage] 2-D field, relative score error (whole / away from the edges) of {name}: "
              + ", ".join(f"sigma {s:g}: {errors[name, s][0]:.2e} / {errors[name, s][1]:.2e}" for s in (1.0, 0.25, 1 / 64)))
    small = 1 / 64
    assert errors["Kikuchi grid", small][0] < 1e-6
    corner, averaged = errors["corner grid (paper)", small], errors["averaging corner-grid windows", small]
    assert corner[1] < 0.5 * averaged[1] and corner[0] < 0.85 * averaged[0]
    assert corner[1] > 1e-2  # an approximation (cycles), not exact: if this fails, the README's numbers are stale


def field_euler_covariance(denoise):
    sigmas = schedule(steps=100)
    eye = torch.eye(FIELD * FIELD, dtype=torch.float64)
    cov = eye * sigmas[0] ** 2
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        step = eye + (s_next - s) / s * (eye - denoise(eye, float(s)))
        cov = step.T @ cov @ step
    return cov


def test_corner_grid_sampling_reproduces_the_field_covariance_better_than_averaging():
    cov = field_covariance()
    errors = {name: float((field_euler_covariance(field_merged_denoiser(plan, cov)) - cov).norm() / cov.norm())
              for name, plan in field_plans().items() if name != "averaging Kikuchi windows"}
    print("[collage] 2-D field, relative covariance error of Euler sampling (exact propagation): "
          + ", ".join(f"{k} {v:.3f}" for k, v in errors.items()))
    assert errors["corner grid (paper)"] < 0.8 * errors["averaging corner-grid windows"]
    assert errors["Kikuchi grid"] < 0.5 * errors["corner grid (paper)"]
