"""Coherence metrics for large images (plain torch; the perceptual networks are passed in).

Images are (3, H, W) tensors in [-1, 1]. `lpips` is any callable (a, b) -> distance for (N, 3, h, w)
batches (LPIPS-VGG as in SyncDiffusion's evaluation); `features` any callable image -> list of feature maps.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def crops(image: torch.Tensor, size: int, stride: int | None = None) -> list[torch.Tensor]:
    """Square crops of `size` px every `stride` px (default: non-overlapping) along the longer side,
    centred on the shorter one - the SyncDiffusion protocol (512 px crops of a 512 px tall panorama)."""
    stride = stride or size
    _, H, W = image.shape
    if min(H, W) < size:
        raise ValueError(f"the image is {W}x{H} px, smaller than one crop of {size} px: give a smaller crop size")
    if W >= H:
        y = (H - size) // 2
        return [image[:, y:y + size, x:x + size] for x in range(0, W - size + 1, stride)]
    x = (W - size) // 2
    return [image[:, y:y + size, x:x + size] for y in range(0, H - size + 1, stride)]


def intra_lpips(image: torch.Tensor, lpips, size: int = 512, stride: int | None = None) -> float:
    """Mean LPIPS over all pairs of crops: lower = the parts of the image look more alike."""
    parts = crops(image, size, stride)
    if len(parts) < 2:
        raise ValueError(f"intra-LPIPS needs at least two crops of {size} px; the image gives {len(parts)}")
    pairs = list(itertools.combinations(range(len(parts)), 2))
    a = torch.stack([parts[i] for i, _ in pairs])
    b = torch.stack([parts[j] for _, j in pairs])
    return float(lpips(a, b).mean())


def gram(feature: torch.Tensor) -> torch.Tensor:
    """Gram matrix of a (1, c, h, w) feature map, normalised by c * h * w (as in the paper's style loss)."""
    n, c, h, w = feature.shape
    flat = feature.reshape(n * c, h * w)
    return flat @ flat.T / (n * c * h * w)


def intra_style_loss(image: torch.Tensor, features, size: int = 512, stride: int | None = None) -> float:
    """Gram-matrix style loss between crops: MSE per layer, summed over layers, averaged over all pairs."""
    parts = crops(image, size, stride)
    grams = [[gram(f) for f in features(p[None])] for p in parts]
    total = [sum(float(F.mse_loss(ga, gb)) for ga, gb in zip(grams[i], grams[j]))
             for i, j in itertools.combinations(range(len(parts)), 2)]
    if not total:
        raise ValueError(f"intra-style loss needs at least two crops of {size} px")
    return sum(total) / len(total)


def seam_score(image: torch.Tensor, columns: list[int] | None = None) -> float:
    """Mean |difference| across the given column boundaries (default: the wrap, last column next to
    the first) over the mean |difference| between neighbouring interior columns. 1.0: the seam is as
    invisible as any interior column step."""
    steps = (image[..., 1:] - image[..., :-1]).abs().mean(dim=(0, 1))  # per column boundary
    interior = float(steps.mean())
    if columns is None:
        across = float((image[..., 0] - image[..., -1]).abs().mean())
    else:
        across = float(torch.stack([steps[c - 1] for c in columns]).mean())
    return across / max(interior, 1e-12)


def sobel_edges(image: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """Binary edge map (H, W) of an image (3, H, W) in [-1, 1] or a grey map (H, W): Sobel gradient
    magnitude above `threshold` times its maximum."""
    grey = image.mean(0) if image.ndim == 3 else image
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=grey.dtype)
    g = F.pad(grey[None, None], (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(g, kx[None, None])
    gy = F.conv2d(g, kx.T[None, None])
    magnitude = (gx ** 2 + gy ** 2).sqrt()[0, 0]
    return magnitude > threshold * magnitude.max().clamp_min(1e-12)


def edge_f1(output_edges: torch.Tensor, condition_edges: torch.Tensor, tolerance: int = 2) -> float:
    """F1 of the output's edges against the condition's, an edge counting as matched when the other
    map has an edge within `tolerance` px."""
    def near(edges):
        k = 2 * tolerance + 1
        return F.max_pool2d(edges.float()[None, None], k, stride=1, padding=tolerance)[0, 0] > 0
    out, cond = output_edges.bool(), condition_edges.bool()
    precision = float((out & near(cond)).sum()) / max(float(out.sum()), 1.0)
    recall = float((cond & near(out)).sum()) / max(float(cond.sum()), 1.0)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def drift_profile(windows: list[torch.Tensor], anchor: int, lpips) -> list[float]:
    """Each window's LPIPS to the anchor window, in window order (windows: (3, h, w) crops of one size)."""
    reference = windows[anchor][None]
    return [float(lpips(w[None], reference)) for w in windows]


def grid_seam_score(image: torch.Tensor, rows=(), columns=()) -> float:
    """Mean |difference| across the given row and column boundaries (boundary b lies between pixels b - 1
    and b) over the mean |difference| between all neighbouring pixels, both directions, of an image (C, H, W).
    1.0: tile borders as invisible as any pixel step; a hard seam scores well above."""
    down = (image[..., 1:, :] - image[..., :-1, :]).abs().mean(dim=(0, 2))  # per row boundary
    right = (image[..., 1:] - image[..., :-1]).abs().mean(dim=(0, 1))       # per column boundary
    if not rows and not columns:
        raise ValueError("grid_seam_score: give the row or column boundaries to score")
    across = torch.cat([down[[r - 1 for r in rows]], right[[c - 1 for c in columns]]])
    interior = float(torch.cat([down, right]).mean())
    return float(across.mean()) / max(interior, 1e-12)


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB of two images of one size (peak: the value range, 2 for [-1, 1])."""
    mse = float((a.double() - b.double()).pow(2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak ** 2 / mse)).item()


def tile_colour_drift(image: torch.Tensor, reference: torch.Tensor, tiles) -> float:
    """How unevenly tiles changed colour: each tile's (y, x, h, w) mean colour shift against the same tile of
    `reference` (C, H, W, the image before), the spread (std) of that shift across tiles, averaged over
    channels. 0 when every tile shifted alike (or not at all)."""
    shifts = torch.stack([(image[:, y:y + h, x:x + w] - reference[:, y:y + h, x:x + w]).mean(dim=(1, 2))
                          for y, x, h, w in tiles])
    if len(shifts) < 2:
        raise ValueError("tile_colour_drift needs at least two tiles")
    return float(shifts.std(dim=0).mean())
