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
