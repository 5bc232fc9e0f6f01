"""Cutting regions out of a canvas and merging region predictions back (plain torch).

Tensors are (batch, channels, height, width) on the canvas and on regions alike; a region is
gathered from its pieces and scattered back the same way, so wrapped regions need no special case.
"""
from __future__ import annotations

import torch

from .plans import Region, RegionPlan


def gather(canvas: torch.Tensor, region: Region) -> torch.Tensor:
    """The region's cells of `canvas` (..., H, W) as a (..., h, w) tensor."""
    if region.rect is not None and region.pieces[0].dst == (0, 0):
        y, x, h, w = region.rect
        return canvas[..., y:y + h, x:x + w]
    out = canvas.new_empty(canvas.shape[:-2] + region.size)
    for p in region.pieces:
        (sy, sx), (dy, dx), (h, w), (dh, dw) = p.src, p.dst, p.size, p.dst_size
        out[..., dy:dy + dh, dx:dx + dw] = _turn(canvas[..., sy:sy + h, sx:sx + w], p.turns)
    return out


def scatter_add(canvas: torch.Tensor, region: Region, values: torch.Tensor) -> None:
    """canvas[region] += values, in place (turned pieces are turned back)."""
    for p in region.pieces:
        (sy, sx), (dy, dx), (h, w), (dh, dw) = p.src, p.dst, p.size, p.dst_size
        canvas[..., sy:sy + h, sx:sx + w] += _turn(values[..., dy:dy + dh, dx:dx + dw], -p.turns)


def scatter_set(canvas: torch.Tensor, region: Region, values: torch.Tensor) -> None:
    """canvas[region] = values, in place (turned pieces are turned back)."""
    for p in region.pieces:
        (sy, sx), (dy, dx), (h, w), (dh, dw) = p.src, p.dst, p.size, p.dst_size
        canvas[..., sy:sy + h, sx:sx + w] = _turn(values[..., dy:dy + dh, dx:dx + dw], -p.turns)


def _turn(block: torch.Tensor, turns: int) -> torch.Tensor:
    return block if turns % 4 == 0 else torch.rot90(block, turns, dims=(-2, -1))


def blend_map(size: tuple[int, int], feather: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Per-cell weight of a region (h, w): 1 everywhere, or a linear ramp over `feather` cells at
    every edge (strictly positive, so a cell that only one region covers keeps its value)."""
    h, w = size
    if feather <= 0:
        return torch.ones(size, dtype=dtype, device=device)

    def ramp(n):
        i = torch.arange(n, dtype=dtype, device=device)
        return ((torch.minimum(i, n - 1 - i) + 1) / (feather + 1)).clamp(max=1.0)

    return torch.minimum(ramp(h)[:, None], ramp(w)[None, :])


def region_weights(plan: RegionPlan, dtype=torch.float32, device=None) -> list[torch.Tensor]:
    """c_i * m_i for every region: the signed weight each region's prediction gets per cell."""
    maps = {}
    out = []
    for region, c in zip(plan.regions, plan.coefficients):
        if region.size not in maps:
            maps[region.size] = blend_map(region.size, plan.feather, dtype, device)
        out.append(maps[region.size] * c)
    return out


def normalizer(plan: RegionPlan, weights: list[torch.Tensor]) -> torch.Tensor:
    """sum_i c_i * m_i on the canvas (H, W); refuses a plan that leaves a cell without weight."""
    total = weights[0].new_zeros(plan.canvas)
    for region, w in zip(plan.regions, weights):
        scatter_add(total, region, w)
    if bool((total.abs() < 1e-6).any()):
        y, x = (total.abs() < 1e-6).nonzero()[0].tolist()
        raise ValueError(f"the plan leaves canvas cell (y={y}, x={x}) without weight: its regions do not cover the canvas")
    return total


class MergeRule:
    """A plan's merge, built once: every region's weight c_i m_i and their normaliser, per dtype and
    device (a sampling run merges every step with the same rule)."""

    def __init__(self, plan: RegionPlan):
        self.plan = plan
        self._built = {}

    def weights(self, like: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        key = (like.dtype, str(like.device))
        if key not in self._built:
            weights = region_weights(self.plan, like.dtype, like.device)
            self._built[key] = (weights, normalizer(self.plan, weights))
        return self._built[key]

    def merger(self, like: torch.Tensor) -> "Merger":
        """An accumulator for one canvas prediction shaped like `like` (B, C, H, W)."""
        return Merger(self.plan, like, self)


class Merger:
    """Accumulates region predictions into the canvas prediction, in any order and batching; regions
    never added count as zero (a zero-coefficient region adds nothing anyway)."""

    def __init__(self, plan: RegionPlan, like: torch.Tensor, rule: MergeRule | None = None):
        self.plan = plan
        self.weights, self.norm = (rule or MergeRule(plan)).weights(like)
        self.total = like.new_zeros(like.shape[:-2] + plan.canvas)

    def add(self, index: int, prediction: torch.Tensor) -> None:
        scatter_add(self.total, self.plan.regions[index], prediction * self.weights[index])

    def result(self) -> torch.Tensor:
        return self.total / self.norm


def merge(plan: RegionPlan, predictions: list[torch.Tensor]) -> torch.Tensor:
    """The canvas prediction from one (B, C, h, w) prediction per region."""
    merger = Merger(plan, predictions[0])
    for i, pred in enumerate(predictions):
        merger.add(i, pred)
    return merger.result()
