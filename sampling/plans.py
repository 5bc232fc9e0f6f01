"""Plans: where each window (or factor-graph node) sits on the canvas, and how much it counts.

A plan is data. `WindowPlan` is what the user asked for, in pixels; `RegionPlan` is what one
sampler executes, in latent cells: regions gathered from the canvas and a signed coefficient per
region. Window plans, factor graphs and cubemaps all resolve to a `RegionPlan`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

ANCHORS = ("first", "middle", "index")
BLENDS = ("uniform", "feather")
# the positions a DiT gives each window: those of an image of the window's size, or the window's own in the canvas
POSITIONS = ("window-local", "canvas-global")


class PlanError(ValueError):
    """A plan that cannot be built or does not fit the latent it is run on."""


@dataclass(frozen=True)
class Piece:
    """An axis-aligned block of canvas cells copied to `dst` inside its region, turned by `turns`
    quarter turns (torch.rot90's direction) on the way: cube faces meet at any orientation."""
    src: tuple[int, int]   # (y, x) on the canvas
    dst: tuple[int, int]   # (y, x) inside the region
    size: tuple[int, int]  # (h, w) on the canvas
    turns: int = 0

    def scaled(self, k: int) -> "Piece":
        return Piece(tuple(v * k for v in self.src), tuple(v * k for v in self.dst), tuple(v * k for v in self.size),
                     self.turns)

    @property
    def dst_size(self) -> tuple[int, int]:
        return self.size if self.turns % 2 == 0 else self.size[::-1]


@dataclass(frozen=True)
class Region:
    """A region of the canvas as the model sees it: pieces that tile a (h, w) rectangle.

    A plain window is one piece; a window that wraps around the canvas edge is several.
    """
    size: tuple[int, int]
    pieces: tuple[Piece, ...]

    def scaled(self, k: int) -> "Region":
        return Region((self.size[0] * k, self.size[1] * k), tuple(p.scaled(k) for p in self.pieces))

    @property
    def rect(self) -> tuple[int, int, int, int] | None:
        """(y, x, h, w) on the canvas when the region is one unwrapped, unturned block, else None."""
        if len(self.pieces) != 1 or self.pieces[0].turns % 4:
            return None
        (y, x), (h, w) = self.pieces[0].src, self.pieces[0].size
        return y, x, h, w

    def cells(self) -> frozenset:
        """The canvas cells (y, x) the region covers, whatever its pieces' turns."""
        return frozenset((p.src[0] + dy, p.src[1] + dx) for p in self.pieces
                         for dy in range(p.size[0]) for dx in range(p.size[1]))


def rect_region(y: int, x: int, h: int, w: int, canvas: tuple[int, int] | None = None) -> Region:
    """A window at (y, x) of size (h, w); with `canvas` given, coordinates wrap around its edges."""
    if canvas is None:
        return Region((h, w), (Piece((y, x), (0, 0), (h, w)),))
    pieces = []
    for sy, dy, ph in _wrapped_spans(y, h, canvas[0]):
        for sx, dx, pw in _wrapped_spans(x, w, canvas[1]):
            pieces.append(Piece((sy, sx), (dy, dx), (ph, pw)))
    return Region((h, w), tuple(pieces))


def _wrapped_spans(start: int, length: int, size: int):
    """Split [start, start+length) on a circle of `size` into (src, dst, length) runs."""
    spans, done = [], 0
    while done < length:
        src = (start + done) % size
        run = min(length - done, size - src)
        spans.append((src, done, run))
        done += run
    return spans


@dataclass(frozen=True)
class RegionPlan:
    """What the sampler executes: every region is denoised, and the canvas prediction is
    sum_i c_i * m_i * D_i / sum_i c_i * m_i over the regions covering a cell (m_i: blend map)."""
    canvas: tuple[int, int]
    regions: tuple[Region, ...]
    coefficients: tuple[float, ...]
    feather: int = 0        # blend ramp in cells; 0 = uniform average (MultiDiffusion)
    anchor: int = 0         # the region other regions are synchronised to
    factors_of: tuple[tuple[int, ...], ...] = ()   # per region, the factors containing it (empty: each its own)
    prompts: tuple = ()     # per region, a text embedding replacing the positive prompt's (empty: none)
    pooled: tuple = ()      # per region, its pooled text embedding (SDXL, SD3, Flux), with `prompts` (empty: none)
    positions: str = "window-local"  # POSITIONS: canvas-global regions are single, unturned blocks of the canvas

    def __post_init__(self):
        if len(self.coefficients) != len(self.regions):
            raise PlanError(f"{len(self.regions)} regions but {len(self.coefficients)} coefficients")
        if not 0 <= self.anchor < len(self.regions):
            raise PlanError(f"anchor {self.anchor} is not one of the {len(self.regions)} regions")
        for name in ("factors_of", "prompts", "pooled"):
            if getattr(self, name) and len(getattr(self, name)) != len(self.regions):
                raise PlanError(f"{len(self.regions)} regions but {len(getattr(self, name))} {name}")
        check_positions(self.positions)
        if self.positions == "canvas-global" and any(r.rect is None for r in self.regions):
            raise PlanError("positions 'canvas-global': a region wraps around the canvas edge or is turned (loops, "
                            "cubemaps), so it has no one position in the canvas")


@dataclass(frozen=True)
class WindowPlan:
    """Overlapping windows over a canvas, in pixels (the WINDOW_PLAN socket type).

    The same plan runs on any model: `layout` converts it to latent cells with the model's
    downscale factor when the sampler sees the latent.
    """
    canvas_px: tuple[int, int]   # (height, width)
    window_px: tuple[int, int]
    stride_px: tuple[int, int]
    anchor: str = "first"
    anchor_index: int = 0
    blend: str = "uniform"
    positions: str = "window-local"

    def __post_init__(self):
        validate_window_plan(self)

    def layout(self, latent_hw: tuple[int, int], factor: int = 8, multiple: int = 1) -> RegionPlan:
        """The windows in latent cells for a latent of `latent_hw` at `factor` pixels per cell."""
        H, W = latent_hw
        ch, cw = self.canvas_px
        if (H * factor, W * factor) != (ch, cw):
            raise PlanError(
                f"the latent is {W * factor}x{H * factor} px ({W}x{H} latent cells at {factor} px/cell) but the "
                f"window plan was made for a {cw}x{ch} px canvas: give WindowPlanner the same size "
                f"(its 'latent' output is the matching empty latent)")
        check_patch_grid((H, W), factor, multiple)
        window = tuple(_cells(v, factor, multiple, name) for v, name in zip(self.window_px, ("window_height", "window_width")))
        stride = tuple(_cells(v, factor, multiple, "stride") for v in self.stride_px)
        ys = window_starts(H, window[0], stride[0])
        xs = window_starts(W, window[1], stride[1])
        regions = tuple(rect_region(y, x, window[0], window[1]) for y in ys for x in xs)
        feather = max(window[0] - stride[0], window[1] - stride[1], 0) if self.blend == "feather" else 0
        return RegionPlan((H, W), regions, (1.0,) * len(regions), feather, self.anchor_position(len(regions)),
                          positions=self.positions)

    def anchor_position(self, count: int) -> int:
        if self.anchor == "first":
            return 0
        if self.anchor == "middle":
            return count // 2
        if self.anchor_index >= count:
            raise PlanError(f"anchor_index {self.anchor_index} is past the last window (the plan has {count}, numbered 0..{count - 1})")
        return self.anchor_index

    def window_count(self) -> tuple[int, int]:
        """(rows, columns) of windows, counted in pixels (equal to the latent count when sizes divide)."""
        return (len(window_starts(self.canvas_px[0], self.window_px[0], self.stride_px[0])),
                len(window_starts(self.canvas_px[1], self.window_px[1], self.stride_px[1])))


def check_patch_grid(latent_hw: tuple[int, int], factor: int, multiple: int) -> None:
    """Refuse a canvas that is not a whole number of the model's patches (DiTs: 2x2 latent cells): windows
    laid out in whole patches could then not reach the far edge on the canvas's patch grid."""
    H, W = latent_hw
    if multiple > 1 and (H % multiple or W % multiple):
        step = multiple * factor
        raise PlanError(f"the canvas is {W * factor}x{H * factor} px but this model works on patches of {multiple}x"
                        f"{multiple} latent cells ({step} px): make the canvas width and height multiples of {step} px "
                        f"(e.g. {W * factor // step * step or step}x{H * factor // step * step or step}) so every window "
                        f"sits on the model's patch grid")


def _cells(px: int, factor: int, multiple: int, name: str) -> int:
    if px % factor:
        raise PlanError(f"{name} = {px} px is not a multiple of this model's {factor} px latent cell")
    cells = px // factor
    return max(multiple, cells // multiple * multiple)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Starts of windows of `window` cells every `stride` cells; the last sits flush with the far edge."""
    if window > length:
        raise PlanError(f"window of {window} is larger than the canvas side of {length}")
    count = math.ceil((length - window) / stride) + 1
    return [min(i * stride, length - window) for i in range(count)]


def validate_window_plan(plan: WindowPlan) -> None:
    names = (("height", "window_height", "stride"), ("width", "window_width", "stride"))
    for canvas, window, stride, (cn, wn, sn) in zip(plan.canvas_px, plan.window_px, plan.stride_px, names):
        for value, name in ((canvas, cn), (window, wn), (stride, sn)):
            if value <= 0 or value % 8:
                raise PlanError(f"{name} must be a positive multiple of 8 px, got {value}")
        if window > canvas:
            raise PlanError(f"{wn} = {window} px is larger than the canvas {cn} of {canvas} px: "
                            f"lower {wn} to at most {canvas} or enlarge the canvas")
        if stride > window:
            raise PlanError(f"stride = {stride} px is larger than {wn} = {window} px: windows would leave gaps "
                            f"(overlap = window - stride must be >= 0)")
    if plan.anchor not in ANCHORS:
        raise PlanError(f"anchor must be one of {ANCHORS}, got {plan.anchor!r}")
    if plan.anchor_index < 0:
        raise PlanError(f"anchor_index must be >= 0, got {plan.anchor_index}")
    if plan.blend not in BLENDS:
        raise PlanError(f"blend must be one of {BLENDS}, got {plan.blend!r}")
    check_positions(plan.positions)


def check_positions(positions: str) -> None:
    if positions not in POSITIONS:
        raise PlanError(f"positions must be one of {POSITIONS}, got {positions!r}")
