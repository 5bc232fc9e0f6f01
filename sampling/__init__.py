"""ControlSync's algorithms in plain torch: plans, merging. Importable without ComfyUI."""
from .plans import Piece, Region, RegionPlan, WindowPlan, PlanError, rect_region, window_starts
from .merge import gather, scatter_add, scatter_set, blend_map, region_weights, normalizer, MergeRule, Merger, merge

__all__ = ["Piece", "Region", "RegionPlan", "WindowPlan", "PlanError", "rect_region", "window_starts",
           "gather", "scatter_add", "scatter_set", "blend_map", "region_weights", "normalizer", "MergeRule", "Merger", "merge"]
