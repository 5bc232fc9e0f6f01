"""Coherence report for images on disk:

    python -m sampling.evaluate IMAGE [IMAGE ...] [--crop 512] [--stride N] [--condition EDGES.png]
                                [--window 512 --window-stride 64] [--lpips-net vgg] [--lpips-dir DIR] [--json]

run from the pack's folder with a Python that has torch, lpips and Pillow (ComfyUI's). Prints one row per
image (a batch file counts its images separately): intra-LPIPS, intra-style loss, the seam score across
the wrap, the edge F1 against a condition image, and the windows' drift from the first window.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from . import metrics
from .perceptual import VGG19_FILE, build_lpips, build_vgg19_style, find_backbone, find_weights, hub_checkpoints

STYLE_FEATURES = "LPIPS VGG16 backbone relu1_2..relu5_3"
VGG19_FEATURES = "VGG19 relu1_1..relu5_1 (as in the paper)"


def lpips_features(model: torch.nn.Module):
    """The LPIPS backbone's five stages as the style loss's feature maps (VGG19 is not shipped by lpips)."""
    def features(image):
        out, h = [], model.scaling_layer(image)
        for block in model.net.children():
            h = block(h)
            out.append(h)
        return out
    return features


def load_image(path: str) -> torch.Tensor:
    import numpy as np
    from PIL import Image
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(rgb).permute(2, 0, 1) * 2 - 1


def style_features(lpips_model, folders: list[str]):
    """(features, label): VGG19 as in the paper when its file is in `folders`, else the LPIPS VGG16 backbone."""
    try:
        return build_vgg19_style(find_weights(VGG19_FILE, folders, "the style loss")), VGG19_FEATURES
    except FileNotFoundError:
        return lpips_features(lpips_model), STYLE_FEATURES


def report(image: torch.Tensor, lpips_model, crop: int, stride: int | None, condition: torch.Tensor | None,
           window: int | None, window_stride: int | None, style=None) -> dict:
    distance = lambda a, b: lpips_model(a, b, normalize=False).flatten()  # noqa: E731
    features, label = style or (lpips_features(lpips_model), STYLE_FEATURES)
    row = {"intra_lpips": None, "intra_style": None, "style_features": label}
    with torch.no_grad():
        if len(metrics.crops(image, crop, stride)) >= 2:
            row["intra_lpips"] = metrics.intra_lpips(image, distance, crop, stride)
            row["intra_style"] = metrics.intra_style_loss(image, features, crop, stride)
        row["seam_score"] = metrics.seam_score(image)
        if condition is not None:
            if condition.shape[-2:] != image.shape[-2:]:
                raise ValueError(f"--condition is {condition.shape[-1]}x{condition.shape[-2]} px but the image is "
                                 f"{image.shape[-1]}x{image.shape[-2]}")
            row["edge_f1"] = metrics.edge_f1(metrics.sobel_edges(image), metrics.sobel_edges(condition))
        if window:
            from .plans import window_starts
            xs = window_starts(image.shape[-1], window, window_stride or window)  # full-height windows along the width
            row["drift"] = metrics.drift_profile([image[:, :, x:x + window] for x in xs], 0, distance)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sampling.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("images", nargs="+")
    p.add_argument("--crop", type=int, default=512, help="crop size for intra-LPIPS / style (SyncDiffusion: 512)")
    p.add_argument("--stride", type=int, default=None, help="crop stride (default: the crop size)")
    p.add_argument("--condition", default=None, help="a condition image (edge map) for the edge F1")
    p.add_argument("--window", type=int, default=None, help="window size in px for the drift profile")
    p.add_argument("--window-stride", type=int, default=None)
    p.add_argument("--lpips-net", default="vgg", choices=["vgg", "alex"])
    p.add_argument("--lpips-dir", action="append", default=[],
                   help="folder with the LPIPS backbone file (and vgg19-dcbb9e9d.pth for the paper's style loss)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    folders = args.lpips_dir + [hub_checkpoints()]
    try:
        model = build_lpips(args.lpips_net, find_backbone(args.lpips_net, folders))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    style = style_features(model, folders)
    condition = load_image(args.condition) if args.condition else None
    rows = []
    for path in args.images:
        try:
            rows.append({"image": path, **report(load_image(path), model, args.crop, args.stride, condition,
                                                 args.window, args.window_stride, style)})
        except ValueError as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'image':40s} {'intra-LPIPS':>11s} {'style x1e3':>10s} {'seam':>6s} {'edge F1':>7s}  drift")
    for r in rows:
        fmt = lambda v, scale=1.0: "-" if v is None else f"{v * scale:.4f}"  # noqa: E731
        drift = " ".join(f"{v:.3f}" for v in r.get("drift", []))
        print(f"{r['image'][-40:]:40s} {fmt(r['intra_lpips']):>11s} {fmt(r['intra_style'], 1e3):>10s} "
              f"{r['seam_score']:6.2f} {fmt(r.get('edge_f1')):>7s}  {drift}")
    print(f"(style loss over {style[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
