"""Low-pass conditioning: a known low-resolution image y constrains the result u through y = H u, H area
downsampling onto y's grid (plain torch). DiffCollage, appendix C.1: "H can be a low-pass filter that
produces a low-resolution image ... and the task would essentially become super-resolution".

H, precisely. On one axis, n input cells onto m output cells (n >= m, any ratio): output cell i covers the
interval [i n / m, (i + 1) n / m) of the input axis and is the mean of the input over it, each input cell j
weighted by the length it shares with it:
    A[i, j] = |[i n / m, (i + 1) n / m) & [j, j + 1)| / (n / m).
On a grid H = A_h (x) A_w, acting on the last two dims: H u = A_h u A_w^T. For an integer ratio k this is
average pooling over k x k blocks (torch's `interpolate(mode="area")`, `adaptive_avg_pool2d`); for other
ratios it is the exact area average (torch's adaptive pooling instead gives every cell an interval touches
the same weight, which is not a box filter of one width).

H^+. A has full row rank when n >= m (row i starts at column floor(i n / m), a new one for every i), so
A^+ = A^T (A A^T)^-1, H^+ = A_h^+ (x) A_w^+ and H H^+ = I. For an integer ratio A A^T = I / k: A^+ = k A^T,
nearest-neighbour upsampling. Replacement's projection H^+ y + (I - H^+ H) u = u + H^+ (y - H u) then
moves every k x k block by one constant so that its mean becomes y's pixel; for other ratios by the
smoothest such correction (the least-norm one).

Gain. Every input cell gives its outputs weights summing to m / n and every row of A sums to 1, so A A^T
has constant row sums m / n: its largest eigenvalue is m / n (Perron), and H H^T's is
g = (m_h m_w) / (n_h n_w), the `gain` Reconstruction divides its weight by (conditional.py).

The operator is applied as sparse weights (at most n + m per axis), so H, H^T and H^+ cost O(u) memory
on 16K-class canvases; (A A^T)^-1 (m x m) is built only when H^+ is asked for.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=64)
def area_weights(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, weights) of the m x n area-resampling matrix A (float64, exact: integer arithmetic
    in units of 1 / m of an input cell)."""
    if not 1 <= m <= n:
        raise ValueError(f"area downsampling maps {n} cells onto 1..{n} cells, not {m}")
    rows, cols, weights = [], [], []
    for i in range(m):
        start, end = i * n, (i + 1) * n            # the output cell, in units of 1 / m
        for j in range(start // m, -(-end // m)):   # the input cells it touches
            shared = min(end, (j + 1) * m) - max(start, j * m)
            rows.append(i)
            cols.append(j)
            weights.append(shared / n)
    return torch.tensor(rows), torch.tensor(cols), torch.tensor(weights, dtype=torch.float64)


def area_matrix(n: int, m: int) -> torch.Tensor:
    """A as a dense (m, n) float64 matrix (small sizes; for tests and inspection)."""
    rows, cols, weights = area_weights(n, m)
    return torch.zeros(m, n, dtype=torch.float64).index_put_((rows, cols), weights)


@functools.lru_cache(maxsize=8)
def _gram_inverse(n: int, m: int) -> torch.Tensor:
    """(A A^T)^-1, (m, m) float64. A A^T sums w_ij w_kj over the input cells j two outputs share (a dense A
    would be m x n)."""
    rows, cols, weights = area_weights(n, m)
    by_column = {}
    for i, j, w in zip(rows.tolist(), cols.tolist(), weights.tolist()):
        by_column.setdefault(j, []).append((i, w))
    pairs = [(i, k, wi * wk) for entries in by_column.values() for i, wi in entries for k, wk in entries]
    i, k, v = zip(*pairs)
    gram = torch.zeros(m, m, dtype=torch.float64).index_put_((torch.tensor(i), torch.tensor(k)),
                                                           torch.tensor(v, dtype=torch.float64), accumulate=True)
    return torch.linalg.inv(gram)


class AreaDownsample:
    """H: (..., h, w) -> (..., m_h, m_w), area downsampling of a canvas onto a coarser grid (module doc).
    Linear; `adjoint` is H^T, `pinv` H^+ (H H^+ = I), `gain` the largest eigenvalue of H H^T."""

    def __init__(self, source: tuple[int, int], target: tuple[int, int]):
        source, target = tuple(int(v) for v in source), tuple(int(v) for v in target)
        for s, t, name in zip(source, target, ("height", "width")):
            if not 1 <= t <= s:
                raise ValueError(f"low-pass conditioning: the low-resolution grid's {name} ({t}) must be between 1 and "
                                 f"the canvas's ({s}): y = H(u) downsamples the canvas onto y's grid")
        self.source, self.target = source, target
        self.gain = (target[0] * target[1]) / (source[0] * source[1])  # the largest eigenvalue of H H^T
        self._on = {}

    def _axes(self, like: torch.Tensor):
        key = (like.dtype, str(like.device))
        if key not in self._on:
            self._on[key] = [tuple(t.to(like.device) if t.dtype == torch.long else t.to(like.device, like.dtype)
                                   for t in area_weights(n, m)) for n, m in zip(self.source, self.target)]
        return self._on[key]

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        self._check(u, self.source, "canvas")
        for axis, (rows, cols, weights) in zip((-2, -1), self._axes(u)):
            u = _spread(u, axis, cols, rows, weights, self.target[axis])
        return u

    def adjoint(self, v: torch.Tensor) -> torch.Tensor:
        self._check(v, self.target, "low-resolution")
        for axis, (rows, cols, weights) in zip((-2, -1), self._axes(v)):
            v = _spread(v, axis, rows, cols, weights, self.source[axis])
        return v

    def pinv(self, v: torch.Tensor) -> torch.Tensor:
        """H^+ v = A_h^+ v A_w^+^T, A^+ = A^T (A A^T)^-1."""
        self._check(v, self.target, "low-resolution")
        for axis, n, m in zip((-2, -1), self.source, self.target):
            inverse = _gram_inverse(n, m).to(v.device, v.dtype)
            v = torch.movedim(torch.movedim(v, axis, -1) @ inverse, -1, axis)  # (A A^T)^-1 is symmetric
        return self.adjoint(v)

    @staticmethod
    def _check(t: torch.Tensor, hw: tuple[int, int], name: str) -> None:
        if tuple(t.shape[-2:]) != hw:
            raise ValueError(f"low-pass conditioning: expected a {name} grid of {hw[1]}x{hw[0]} cells, got "
                             f"{t.shape[-1]}x{t.shape[-2]}")


def _spread(t: torch.Tensor, axis: int, take: torch.Tensor, put: torch.Tensor, weights: torch.Tensor,
            size: int) -> torch.Tensor:
    """out[put[k]] += weights[k] * t[take[k]] along `axis`: A (or A^T, with take and put swapped) applied."""
    shape = [1] * t.ndim
    shape[axis] = -1
    picked = t.index_select(axis, take) * weights.view(shape)
    out_shape = list(t.shape)
    out_shape[axis] = size
    return t.new_zeros(out_shape).index_add_(axis, put, picked)
