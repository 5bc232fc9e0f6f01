"""A picture of a plan: region outlines over the canvas image, the anchor filled (plain torch)."""
from __future__ import annotations

import torch

from .plans import RegionPlan

_PALETTE = torch.tensor([[0.95, 0.35, 0.2], [0.2, 0.6, 0.95], [0.3, 0.85, 0.35], [0.95, 0.8, 0.2],
                         [0.75, 0.35, 0.9], [0.2, 0.85, 0.85]])
ANCHOR_COLOR = torch.tensor([1.0, 0.15, 0.6])


def draw_plan(image: torch.Tensor, plan: RegionPlan, cell_px: float, thickness: int = 3) -> torch.Tensor:
    """`image` (H, W, 3) in [0, 1] showing the canvas at `cell_px` pixels per latent cell; returns a
    copy with every window or factor (not their overlaps) outlined in its own colour and the anchor
    region tinted."""
    out = image.clone()
    H, W = out.shape[:2]
    for index, region in enumerate(plan.regions):
        if plan.factors_of and plan.factors_of[index] != (index,):
            continue  # an overlap of factors
        color = ANCHOR_COLOR if index == plan.anchor else _PALETTE[index % len(_PALETTE)]
        # nudge overlapping outlines apart so neighbouring windows stay distinguishable
        inset = (index % 3) * thickness
        for piece in region.pieces:
            y0, x0 = (round(v * cell_px) for v in piece.src)
            y1, x1 = (round((s + n) * cell_px) for s, n in zip(piece.src, piece.size))
            y0, x0, y1, x1 = min(y0 + inset, H - 1), min(x0 + inset, W - 1), max(y1 - inset, 1), max(x1 - inset, 1)
            if index == plan.anchor:
                out[y0:y1, x0:x1] = 0.7 * out[y0:y1, x0:x1] + 0.3 * color
            t = thickness
            out[y0:min(y0 + t, y1), x0:x1] = color
            out[max(y1 - t, y0):y1, x0:x1] = color
            out[y0:y1, x0:min(x0 + t, x1)] = color
            out[y0:y1, max(x1 - t, x0):x1] = color
    return out
