"""DiffCollage factor graphs as region plans (plain torch-free geometry).

Factors are overlapping windows; variables are their overlaps. The merged prediction is
D = sum_f D_f - sum_v (deg(v) - 1) D_v (the Bethe approximation, exact on trees). For overlaps that
meet again (grid corners) the same rule generalises to counting numbers over the intersections of
factors: c_R = 1 - sum of c_S over the regions S strictly containing R (Kikuchi); on chains and
cycles this is exactly DiffCollage's rule, and on every canvas cell the coefficients sum to 1.

The paper's own grid (Sec. 4.1: "each factor is an image patch that overlaps with 4 other factors at
the 4 corners ... each variable node is connected to 2 factors") is `corner_grid_factors`: two
staggered tilings, so factors meet only at corner quarters, every variable has degree 2 and the
Kikuchi counting numbers are the Bethe ones (+1 per factor, -1 per quarter).
"""
from __future__ import annotations

from dataclasses import dataclass

from .plans import PlanError, RegionPlan, rect_region, window_starts


@dataclass(frozen=True)
class Span:
    """[start, start + length) on a line, or on a circle of `size` cells when `wrap`."""
    start: int
    length: int

    def cells(self, size: int, wrap: bool) -> frozenset:
        return frozenset(((self.start + i) % size) if wrap else self.start + i for i in range(self.length))


def _span_of(cells: frozenset, size: int, wrap: bool) -> Span:
    """The one contiguous (possibly wrapping) span holding exactly `cells`."""
    if len(cells) == size:
        return Span(0, size)
    starts = [c for c in cells if ((c - 1) % size if wrap else c - 1) not in cells]
    if len(starts) != 1:
        raise PlanError("two factors overlap in more than one place: use more factors or less overlap")
    return Span(starts[0], len(cells))


@dataclass(frozen=True)
class Box:
    ys: Span
    xs: Span


def factor_region_plan(canvas: tuple[int, int], factors: list[Box], wrap_x: bool = False,
                       anchor: int = 0) -> RegionPlan:
    """Factors plus every intersection of factors, each with its counting number; regions whose
    counting number is zero are left out (they cost a model call and add nothing)."""
    H, W = canvas

    def cellset(b: Box):
        return (b.ys.cells(H, False), b.xs.cells(W, wrap_x))

    sets = {cellset(b): b for b in factors}
    if len(sets) != len(factors):
        raise PlanError("two factors cover the same cells")
    check_connected([cellset(b) for b in factors])
    frontier = list(sets)
    while frontier:  # close the family under intersection
        new = []
        for a in frontier:
            for b in list(sets):
                inter = (a[0] & b[0], a[1] & b[1])
                if inter[0] and inter[1] and inter not in sets:
                    sets[inter] = Box(_span_of(inter[0], H, False), _span_of(inter[1], W, wrap_x))
                    new.append(inter)
        frontier = new
    order = sorted(sets, key=lambda s: -len(s[0]) * len(s[1]))
    counting = {}
    for r in order:
        above = [s for s in counting if r[0] <= s[0] and r[1] <= s[1] and s != r]
        counting[r] = 1 - sum(counting[s] for s in above)
    factor_keys = [cellset(b) for b in factors]
    kept = factor_keys + [r for r in order if r not in factor_keys and counting[r] != 0]
    regions, coefficients, factors_of = [], [], []
    for key in kept:
        box = sets[key]
        regions.append(rect_region(box.ys.start, box.xs.start, box.ys.length, box.xs.length, canvas if wrap_x else None))
        coefficients.append(float(counting[key]))
        factors_of.append(tuple(i for i, f in enumerate(factor_keys) if key[0] <= f[0] and key[1] <= f[1]))
        if key not in factor_keys and len(factors_of[-1]) < 2:  # an overlap is shared by the factors it came from
            raise PlanError("internal: an overlap region lies inside fewer than two factors")
    return RegionPlan(canvas, tuple(regions), tuple(coefficients), 0, anchor, tuple(factors_of))


def check_connected(factors: list) -> None:
    """Refuse factors that fall apart into pieces sharing no cells: nothing would tie them together."""
    def touch(a, b):
        return bool(a[0] & b[0]) and bool(a[1] & b[1])
    reached, frontier = {0}, [0]
    while frontier:
        i = frontier.pop()
        for j in range(len(factors)):
            if j not in reached and touch(factors[i], factors[j]):
                reached.add(j)
                frontier.append(j)
    if len(reached) != len(factors):
        lost = min(set(range(len(factors))) - reached)
        raise PlanError(f"the factors are not one connected graph: factor {lost} shares no cells with factor 0's "
                        f"part; give the factors an overlap (the DiffCollage paper: half a window)")


def chain_factors(canvas: tuple[int, int], window: tuple[int, int], overlap: int, axis: int) -> list[Box]:
    """Factors along one axis (0: top to bottom, 1: left to right); the last sits flush with the edge."""
    size, length = window[axis], canvas[axis]
    if window[1 - axis] != canvas[1 - axis]:
        raise PlanError("a chain's factors span the canvas across the chain: window and canvas must match there")
    starts = window_starts(length, size, size - overlap)
    spans = [Span(s, size) for s in starts]
    full = Span(0, canvas[1 - axis])
    return [Box(full, s) if axis == 1 else Box(s, full) for s in spans]


def cycle_factors(canvas: tuple[int, int], window: tuple[int, int], overlap: int) -> list[Box]:
    """A horizontal loop: factors every (window - overlap) cells, the last overlapping the first."""
    H, W = canvas
    step = window[1] - overlap
    if window[0] != H:
        raise PlanError("a loop's factors span the canvas height: window_height must equal the canvas height")
    if W % step:
        raise PlanError(f"for a seamless loop the canvas width ({W} cells) must be a multiple of window - overlap "
                        f"({step} cells)")
    if W // step < 3:
        raise PlanError("a loop needs at least 3 factors: widen the canvas or shrink the window")
    return [Box(Span(0, H), Span(k * step, window[1])) for k in range(W // step)]


def grid_factors(canvas: tuple[int, int], window: tuple[int, int], overlap: int) -> list[Box]:
    ys = window_starts(canvas[0], window[0], window[0] - overlap)
    xs = window_starts(canvas[1], window[1], window[1] - overlap)
    return [Box(Span(y, window[0]), Span(x, window[1])) for y in ys for x in xs]


def corner_grid_factors(canvas: tuple[int, int], window: tuple[int, int]) -> list[Box]:
    """DiffCollage's grid graph: windows tiling the canvas edge to edge (at multiples of the window), and
    a second tiling shifted by half a window both ways, kept where it fits inside the canvas. A window of
    one tiling meets the (up to) 4 windows of the other at its 4 corners, in quarter-window overlaps, and
    never a window of its own tiling; every overlap lies in exactly 2 windows. Row-major order (by top-left
    corner), so the factors read like text."""
    (H, W), (h, w) = canvas, window
    if h % 2 or w % 2:
        raise PlanError(f"corner_grid: the second tiling sits half a window in, so the window must be an even "
                        f"number of latent cells; got {w}x{h}")
    for size, win, name in ((H, h, "height"), (W, w, "width")):
        if size % win:
            raise PlanError(f"corner_grid: the windows tile the canvas edge to edge, so the canvas {name} "
                            f"({size} cells) must be a multiple of the window's ({win} cells)")
    if (H // h == 1) != (W // w == 1):
        raise PlanError("corner_grid: the second tiling needs at least 2 windows each way (the canvas at least "
                        "twice the window in height and width); for a single row or column use chain")
    first = [(y, x) for y in range(0, H, h) for x in range(0, W, w)]
    second = [(y, x) for y in range(h // 2, H - h + 1, h) for x in range(w // 2, W - w + 1, w)]
    return [Box(Span(y, h), Span(x, w)) for y, x in sorted(first + second)]
