"""FactorGraphCollage's plan: a DiffCollage factor graph over a canvas, as the user gives it in pixels."""
from __future__ import annotations

from dataclasses import dataclass, replace

from .conditional import METHODS, ORDERS
from .conditioning import VARIABLE_PROMPTS, region_prompts
from .cubemap import cubemap_plan, face_prompts
from .factor_graphs import chain_factors, corner_grid_factors, cycle_factors, factor_region_plan, grid_factors
from .plans import PlanError, RegionPlan, _cells, check_patch_grid, check_positions

GRAPHS = ("chain", "cycle", "grid", "corner_grid", "cubemap")


@dataclass(frozen=True)
class FactorGraphPlan:
    """A DiffCollage factor graph over a canvas, in pixels (sampled through the WINDOW_PLAN socket)."""
    graph: str
    canvas_px: tuple[int, int]
    window_px: tuple[int, int]
    overlap_px: int
    direction: str = "horizontal"   # chains: horizontal or vertical
    anchor: int = 0
    factor_prompts: tuple = ()      # one text embedding per factor (empty: the sampler's positive prompt)
    variable_prompt: str = "mean"   # overlaps: mean of their factors' embeddings, or the null prompt
    null_prompt: object = None      # the empty prompt's embedding, for variable_prompt "null"
    factor_pooled: tuple = ()       # one pooled embedding per factor (models with one: SDXL, SD3, Flux), or empty
    null_pooled: object = None      # the empty prompt's pooled embedding
    known_pixels: str = "replacement"   # how a noise-masked latent's known cells are kept (METHODS)
    reconstruction_weight: float = 1.0  # w of Reconstruction: D - (w/2) grad ||H D - y||^2
    order: str = "joint"            # joint (DiffCollage) or autoregressive (window after window, the baseline)
    positions: str = "window-local"  # POSITIONS (plans.py); loops and cubemaps have no canvas positions

    def __post_init__(self):
        if self.graph not in GRAPHS:
            raise PlanError(f"graph must be one of {GRAPHS}, got {self.graph!r}")
        for value, name in ((self.canvas_px[0], "height"), (self.canvas_px[1], "width"),
                            (self.window_px[0], "window_height"), (self.window_px[1], "window_width")):
            if value <= 0 or value % 8:
                raise PlanError(f"{name} must be a positive multiple of 8 px, got {value}")
        if self.overlap_px < 0 or self.overlap_px % 8:
            raise PlanError(f"overlap must be a multiple of 8 px and >= 0, got {self.overlap_px}")
        for window, canvas, name in zip(self.window_px, self.canvas_px, ("window_height", "window_width")):
            if window > canvas:
                raise PlanError(f"{name} = {window} px is larger than the canvas ({canvas} px): the graph is too small "
                                f"for the window")
        if self.graph == "cubemap":
            face = self.canvas_px[0]
            if self.canvas_px[1] != 6 * face:
                raise PlanError(f"cubemap: the canvas is a strip of 6 square faces, 6 times as wide as high; got "
                                f"{self.canvas_px[1]}x{face} px")
            if self.window_px[0] != face:
                raise PlanError(f"cubemap: window_height must equal the face size ({face} px): each loop of faces is "
                                f"one face high; got {self.window_px[0]}")
        if self.graph == "corner_grid":
            self._check_corner_grid()
        if self.graph in ("grid", "corner_grid"):
            along = min(self.window_px)
        else:
            along = self.window_px[0] if (self.graph == "chain" and self.direction == "vertical") else self.window_px[1]
        if self.known_pixels not in METHODS:
            raise PlanError(f"known_pixels must be one of {METHODS}, got {self.known_pixels!r}")
        if self.order not in ORDERS:
            raise PlanError(f"order must be one of {ORDERS}, got {self.order!r}")
        check_positions(self.positions)
        if self.positions == "canvas-global" and self.graph in ("cycle", "cubemap"):
            raise PlanError(f"positions: a {'loop' if self.graph == 'cycle' else 'cubemap'} keeps window-local positions: "
                            f"it has no edge to count canvas positions from, so they would jump where it wraps (a seam "
                            f"the loop exists to avoid){'' if self.graph == 'cycle' else ' and turn between faces'}. "
                            f"Use 'window-local'.")
        if self.reconstruction_weight < 0:
            raise PlanError(f"reconstruction_weight must be >= 0, got {self.reconstruction_weight}")
        if self.variable_prompt not in VARIABLE_PROMPTS:
            raise PlanError(f"variable prompts must be one of {VARIABLE_PROMPTS}, got {self.variable_prompt!r}")
        if self.overlap_px >= along:
            raise PlanError(f"overlap = {self.overlap_px} px must be smaller than the window ({self.window_px[1]}x"
                            f"{self.window_px[0]} px)")

    def _check_corner_grid(self):
        (H, W), (h, w) = self.canvas_px, self.window_px
        if h != w or 2 * self.overlap_px != w:
            raise PlanError(f"corner_grid (the paper's grid): square factors overlapping their 4 diagonal neighbours "
                            f"by a quarter, half a window each way: set window_width = window_height = 2 x overlap "
                            f"(e.g. 512, 512, 256); got a {w}x{h} px window and overlap {self.overlap_px} px")
        for size, name in ((H, "height"), (W, "width")):
            if size % w:
                raise PlanError(f"corner_grid: the factors tile the canvas edge to edge, so {name} must be a multiple "
                                f"of the window ({w} px): e.g. {max(2, round(size / w)) * w}; got {size}")

    def layout(self, latent_hw: tuple[int, int], factor: int = 8, multiple: int = 1) -> RegionPlan:
        return replace(self._layout(latent_hw, factor, multiple), positions=self.positions)

    def _layout(self, latent_hw: tuple[int, int], factor: int, multiple: int) -> RegionPlan:
        H, W = latent_hw
        if (H * factor, W * factor) != tuple(self.canvas_px):
            raise PlanError(
                f"the latent is {W * factor}x{H * factor} px but the factor graph was made for a "
                f"{self.canvas_px[1]}x{self.canvas_px[0]} px canvas: give FactorGraphCollage the same size")
        check_patch_grid((H, W), factor, multiple)
        window = tuple(_cells(v, factor, multiple, n) for v, n in zip(self.window_px, ("window_height", "window_width")))
        overlap = _cells(self.overlap_px, factor, multiple, "overlap") if self.overlap_px else 0
        if self.graph == "cubemap":
            return self._cubemap_layout(H, window[1], overlap)
        if self.graph == "chain":
            boxes = chain_factors((H, W), window, overlap, 0 if self.direction == "vertical" else 1)
        elif self.graph == "cycle":
            boxes = cycle_factors((H, W), window, overlap)
        elif self.graph == "corner_grid":
            boxes = corner_grid_factors((H, W), window)
        else:
            boxes = grid_factors((H, W), window, overlap)
        if self.anchor >= len(boxes):
            raise PlanError(f"anchor {self.anchor} is past the last factor ({len(boxes)} factors)")
        plan = factor_region_plan((H, W), boxes, wrap_x=self.graph == "cycle", anchor=self.anchor)
        if not self.factor_prompts:
            return plan
        if len(self.factor_prompts) != len(boxes):
            raise PlanError(f"prompts: {len(self.factor_prompts)} prompts for {len(boxes)} factors - give one per factor")
        plan = replace(plan, prompts=region_prompts(list(self.factor_prompts), plan.factors_of, self.variable_prompt,
                                                    self.null_prompt))
        if self.factor_pooled:
            plan = replace(plan, pooled=region_prompts(list(self.factor_pooled), plan.factors_of, self.variable_prompt,
                                                       self.null_pooled))
        return plan

    def _cubemap_layout(self, face: int, window: int, overlap: int) -> RegionPlan:
        plan = cubemap_plan(face, window, overlap, self.anchor)
        if not self.factor_prompts:
            return plan
        plan = replace(plan, prompts=face_prompts(plan, list(self.factor_prompts)))
        return replace(plan, pooled=face_prompts(plan, list(self.factor_pooled))) if self.factor_pooled else plan

    def factor_count(self, latent_hw: tuple[int, int], factor: int = 8) -> int:
        """How many prompts 'per factor' takes: one per factor (a cubemap: one per face)."""
        if self.graph == "cubemap":
            return 6
        plan = replace(self, factor_prompts=(), factor_pooled=()).layout(latent_hw, factor)
        return sum(1 for i, f in enumerate(plan.factors_of) if f == (i,))
