"""Low-pass conditioning (super-resolution, DiffCollage appendix C.1) in plain torch: H = area downsampling
against a dense matrix written here from its definition, H^+ against torch.linalg.pinv, Replacement and
Reconstruction against the paper's formulas, and on the analytic test bed (exact Gaussian denoisers)
H(result) pulled to y."""
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from comfy_host import load_sampling

S = load_sampling()
from controlsync_sampling import testbed  # noqa: E402
from controlsync_sampling.collage import FactorGraphPlan  # noqa: E402
from controlsync_sampling.conditional import project, reconstruct  # noqa: E402
from controlsync_sampling.lowpass import AreaDownsample  # noqa: E402
from test_conditional import merged_x0, reconstruction_plans, tiny_denoisers  # noqa: E402

# (canvas h, w) -> (y's h, w): integer ratios, rational ones, mixed, and 1 (no downsampling on that axis)
SIZES = [((8, 12), (2, 3)), ((10, 7), (4, 3)), ((9, 16), (6, 5)), ((7, 11), (7, 4)), ((12, 12), (5, 12))]


def box_filter(n, m):
    """A[i, j] = |[i n/m, (i+1) n/m) & [j, j+1)| / (n/m): output cell i is the mean of the input over its
    interval, each input cell weighted by the length it shares with it (exact fractions)."""
    r = Fraction(n, m)
    a = torch.zeros(m, n, dtype=torch.float64)
    for i in range(m):
        lo, hi = i * r, (i + 1) * r
        for j in range(n):
            shared = min(hi, j + 1) - max(lo, j)
            if shared > 0:
                a[i, j] = float(shared / r)
    return a


def dense(source, target):
    """H on a flattened (h, w) grid: A_h (x) A_w."""
    return torch.kron(box_filter(source[0], target[0]), box_filter(source[1], target[1]))


def flat(t):
    return t.flatten(-2)


@pytest.mark.parametrize("source,target", SIZES)
def test_area_downsampling_is_the_box_filter_and_its_adjoint_and_pseudo_inverse(source, target):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(2, 3, *source, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, *target, generator=g, dtype=torch.float64)
    H, M = AreaDownsample(source, target), dense(source, target)
    pinv = torch.linalg.pinv(M)
    assert torch.allclose(flat(H(u)), flat(u) @ M.T, atol=1e-13)
    assert torch.allclose(flat(H.adjoint(v)), flat(v) @ M, atol=1e-13)
    assert torch.allclose(flat(H.pinv(v)), flat(v) @ pinv.T, atol=1e-12)
    assert torch.allclose(H(H.pinv(v)), v, atol=1e-12)  # H H^+ = I: H has full row rank
    # the gain Reconstruction divides by: the largest eigenvalue of H H^T
    assert H.gain == pytest.approx(float(torch.linalg.eigvalsh(M @ M.T).max()), rel=1e-12)


def test_integer_ratios_are_torchs_area_interpolation():
    """For an integer ratio the box filter is torch's own area resampling (average pooling); for another ratio
    torch's adaptive pooling gives every cell an interval touches equal weight, which H does not."""
    u = torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(AreaDownsample((24, 40), (6, 10))(u), F.interpolate(u, size=(6, 10), mode="area"), atol=1e-14)
    assert torch.allclose(AreaDownsample((24, 40), (12, 5))(u), F.adaptive_avg_pool2d(u, (12, 5)), atol=1e-14)
    assert not torch.allclose(AreaDownsample((24, 40), (9, 15))(u), F.adaptive_avg_pool2d(u, (9, 15)), atol=1e-3)


@pytest.mark.parametrize("source,target", SIZES)
def test_replacement_is_the_papers_projection(source, target):
    """proj(u0) = H^+ y + (I - H^+ H) u0, written here with the dense H and torch.linalg.pinv; it is idempotent,
    lands on y, and moves u0 by the least-norm correction (orthogonal to H's null space)."""
    g = torch.Generator().manual_seed(2)
    u0 = torch.randn(2, 3, *source, generator=g, dtype=torch.float64)
    y = torch.randn(2, 3, *target, generator=g, dtype=torch.float64)
    H, M = AreaDownsample(source, target), dense(source, target)
    pinv = torch.linalg.pinv(M)
    eye = torch.eye(M.shape[1], dtype=torch.float64)
    expected = flat(y) @ pinv.T + flat(u0) @ (eye - pinv @ M).T
    projected = project(H, u0, y)
    assert torch.allclose(flat(projected), expected, atol=1e-12)
    assert torch.allclose(project(H, projected, y), projected, atol=1e-12)
    assert torch.allclose(H(projected), y, atol=1e-12)
    null = eye - pinv @ M  # the projector onto H's null space
    assert float((flat(projected - u0) @ null.T).abs().max()) < 1e-12
    assert float((projected - u0).abs().max()) > 0.1


def test_integer_replacement_shifts_every_block_to_ys_pixel():
    """At ratio k the pseudo-inverse is k^2 H^T (nearest-neighbour upsampling): the projection adds one constant
    per k x k block, the difference between y's pixel and the block's mean."""
    g = torch.Generator().manual_seed(3)
    u0 = torch.randn(1, 2, 8, 12, generator=g, dtype=torch.float64)
    y = torch.randn(1, 2, 2, 3, generator=g, dtype=torch.float64)
    shift = y - F.avg_pool2d(u0, 4)
    expected = u0 + shift.repeat_interleave(4, -2).repeat_interleave(4, -1)
    assert torch.allclose(project(AreaDownsample((8, 12), (2, 3)), u0, y), expected, atol=1e-13)


@pytest.mark.parametrize("name", list(reconstruction_plans()))
def test_collage_reconstruction_with_a_low_pass_h_is_the_papers_gradient(name):
    """Algorithm 5's update lambda grad ||H x0 - y||^2 through the whole merged x0 (one autograd graph, the
    dense H written here), lambda = w / (2 g) with g the largest eigenvalue of H H^T, for every plan kind."""
    plan = reconstruction_plans()[name]
    Hc, Wc = plan.canvas
    target = (max(1, Hc * 2 // 5), max(1, Wc // 3))  # rational on one axis, integer or rational on the other
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 2, Hc, Wc, generator=g, dtype=torch.float64)
    y = torch.randn(2, 2, *target, generator=g, dtype=torch.float64)
    denoise = tiny_denoisers()
    M = dense((Hc, Wc), target)
    gain = float(torch.linalg.eigvalsh(M @ M.T).max())
    weight = 0.8
    leaf = x.clone().requires_grad_(True)
    x0 = merged_x0(plan, leaf, denoise)
    residual = flat(x0) @ M.T - flat(y)
    (expected,) = torch.autograd.grad(weight / (2 * gain) * residual.pow(2).sum(), leaf)
    got = reconstruct(plan, x, lambda b, v: denoise(b[0], v), x0.detach(), AreaDownsample((Hc, Wc), target), y, weight)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12), name
    assert float(expected.norm()) > 0


def bed_case(m):
    world = testbed.GlobalStyleWorld()
    plan = FactorGraphPlan("chain", (8, 8 * 48), (8, 8 * 16), 8 * 8).layout((1, 48), 8)
    g = torch.Generator().manual_seed(1)
    truth = torch.randn(200, 48, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(world.covariance(48)).T
    H = AreaDownsample((1, 48), (1, m))
    return world, plan, H, H(truth[:, None, None, :])[:, 0, 0, :]


def observed_error(H, x, y):
    return float((H(x[:, None, None, :])[:, 0, 0, :] - y).norm(dim=1).mean())


@pytest.mark.parametrize("m", [12, 18])
def test_replacement_and_reconstruction_pull_the_low_pass_of_the_result_to_y(m):
    """On the analytic test bed (a chain collage of exact Gaussian denoisers, 48 cells) conditioned on y = H x0 of
    true samples, H = area downsampling by 4 (48 -> 12) or by 8/3 (48 -> 18): unguided samples miss y by more
    than y's own size; Replacement (Algorithm 4) ends on it exactly; Reconstruction (w 1) lowers the
    x0-prediction's ||H x0 - y|| step by step to far below: at the integer ratio, where H H^T = g I, to where
    Replacement lands."""
    world, plan, H, y = bed_case(m)
    free, _ = testbed.sample_conditional(world, plan, H, y, "none")
    replaced, _ = testbed.sample_conditional(world, plan, H, y, "replacement")
    guided, trace = testbed.sample_conditional(world, plan, H, y, "collage_reconstruction", 1.0)
    scale = float(y.norm(dim=1).mean())
    errors = {"none": observed_error(H, free, y), "replacement": observed_error(H, replaced, y),
              "reconstruction": observed_error(H, guided, y)}
    print(f"[lowpass] 48 -> {m}: ||H x - y|| none {errors['none']:.3f}, replacement {errors['replacement']:.1e}, "
          f"reconstruction {errors['reconstruction']:.1e} (||y|| {scale:.3f}); reconstruction's x0: "
          f"{trace[0]:.3f} -> {trace[20]:.3f} -> {trace[40]:.2e} -> {trace[-1]:.1e}")
    assert errors["none"] > scale
    assert errors["replacement"] < 1e-12 * scale
    later = trace[10:]
    assert all(b <= a * (1 + 1e-9) for a, b in zip(later, later[1:]))
    bound = 1e-5 if m == 12 else 3e-3
    assert errors["reconstruction"] < bound * scale and trace[-1] < bound * trace[0]
