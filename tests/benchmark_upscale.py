"""Benchmark (not a test): upscaling with ControlSync side by side with Ultimate SD Upscale, in one run.

    ~/comfy/venv/bin/python tests/benchmark_upscale.py [--scales 2 4] [--input 256] [--tile 256] [--steps 20]
                                                       [--denoise 0.45] [--out DIR] [--picture PATH]

One input (the shipped photo, workflows/controlsync_outpaint_photo.jpg, resized to --input px) upscaled 2x and 4x
with lanczos (ComfyUI's ImageScaleBy), then refined at the same steps, denoise, sampler (euler, normal), cfg 7 and
seed on the same tiny random-weight SD1.5 models (tests/tiny_models.py: UNet, a ControlNet on the input image as
the tile ControlNet, VAE) by
  USDU            Ultimate SD Upscale's UltimateSDUpscaleNoUpscale (pinned: tests/install_usdu.py), --tile px tiles,
                  Linear order, mask blur 8, seam fix None or Half Tile + Intersections (seam-fix denoise = the
                  denoise, mask blur 8); padding, seam-fix width and padding scaled from the node's defaults for
                  512 px tiles (32, 64, 16) to the tile size;
  ControlSync     VAE Encode (Tiled) -> Window Planner (--tile px windows, stride 3/4 of it) -> ControlSync Sampler ->
                  VAE Decode (Tiled): plain joint windows, and the shipped workflow's set-up (+ Low-pass Guide,
                  replacement in latent space; + Anchor Sync counted from the run: vgg, exact, half-size loss);
  VAE round trip  the upscaled image encoded and decoded (no diffusion): the faithfulness this VAE allows.
Each row runs in a fresh process (peak memory is per process: ru_maxrss).

Sizes: the tiny UNet's attention over a 512 px tile's 4096 latent cells takes ~7 s per CFG step on one core here,
so the defaults are a 256 px input, 256 px tiles and windows (2x: 512 px, 4x: 1024 px); --input 512 --tile 512
is the 512 -> 2048 set-up (hours on this CPU).

Columns: seam score at USDU's tile borders and at ControlSync's window borders (sampling/metrics.py
grid_seam_score: mean |step| across those borders over the mean |step| between all neighbouring pixels; 1 = as
invisible as any pixel step), faithfulness (PSNR and LPIPS-alex of H(result) against the input, H = area
downsampling onto the input's size), colour drift between USDU's tiles (tile_colour_drift: the spread across
tiles of each tile's mean colour shift against the lanczos-upscaled input), seconds, peak RSS, and
model-pixels per step (every UNet evaluation's batch x latent cells x 64, counted on the real model with an
APPLY_MODEL wrapper - cond and uncond, gradient passes and seam-fix passes included - over the steps).

Random weights: the models are not a denoiser and the VAE decodes nearly every latent to one grey, so the
pictures and the faithfulness columns show the mechanisms (tiles stitched vs one joint canvas, the guide), not
image quality; the round-trip row is the floor any method can reach through this VAE.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
PACK = TESTS.parent
PHOTO = PACK / "workflows" / "controlsync_outpaint_photo.jpg"
PICTURE = PACK / "nodes" / "web" / "docs" / "upscale_side_by_side.jpg"
METHODS = ("roundtrip", "usdu_none", "usdu_half_tile", "controlsync", "controlsync_guide_sync")
LABELS = {"roundtrip": "VAE round trip (no diffusion)", "usdu_none": "USDU, seam fix None",
          "usdu_half_tile": "USDU, Half Tile + Intersections", "controlsync": "ControlSync (joint windows)",
          "controlsync_guide_sync": "ControlSync + Low-pass Guide + Anchor Sync (run)"}
TILE, WINDOW, STRIDE, SEED, CFG = 512, 512, 384, 42, 7.0


def load_input(size: int):
    import numpy as np
    import torch
    from PIL import Image
    with Image.open(PHOTO) as photo:
        small = photo.convert("RGB").resize((size, size), Image.LANCZOS)
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0)[None]


def pixel_counter(record: list):
    """APPLY_MODEL wrapper: every UNet evaluation's model-pixels (batch x latent cells x 64)."""
    def wrapper(executor, x, t, *args, **kwargs):
        record.append(int(x.shape[0]) * int(x.shape[-2]) * int(x.shape[-1]) * 64)
        return executor(x, t, *args, **kwargs)
    return wrapper


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def run_row(args) -> None:
    """One method at one scale, in this process; writes the result image (.pt) and its numbers (.json)."""
    import torch
    from comfy_host import find_host, import_host
    import_host(find_host())
    import comfy.patcher_extension
    import nodes
    import lpips_weights
    import tiny_models as tm
    from install_usdu import install, load_in_process
    from controlsync.nodes.anchor_sync import AnchorSync
    from controlsync.nodes.controlsync_sampler import ControlSyncSampler
    from controlsync.nodes.lowpass_guide import ControlSyncLowPass
    from controlsync.nodes.window_planner import WindowPlanner

    lpips_weights.use_cached_backbones()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    usdu = load_in_process(install())["UltimateSDUpscaleNoUpscale"] if args.method.startswith("usdu") else None
    record: list[int] = []
    with torch.inference_mode():
        model, cn, vae = tm.tiny_model(0), tm.tiny_controlnet(7), tm.tiny_vae()
        model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "benchmark.pixels",
                                   pixel_counter(record))
        image = load_input(args.input)
        (upscaled,) = nodes.ImageScaleBy().upscale(image, "lanczos", float(args.scale))
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(tm.text_cond(10), tm.text_cond(11), cn, image,
                                                                    1.0, 0.0, 1.0, vae=vae)
        before = rss_kib()
        t0 = time.perf_counter()
        if args.method == "roundtrip":
            (latent,) = nodes.VAEEncodeTiled().encode(vae, upscaled, 512, 64)
            (out,) = nodes.VAEDecodeTiled().decode(vae, latent, 512, 64)
        elif usdu is not None:
            seam_fix = "None" if args.method == "usdu_none" else "Half Tile + Intersections"
            (out,) = usdu().upscale(upscaled, model, pos, neg, vae, SEED, args.steps, CFG, "euler", "normal",
                                    args.denoise, "Linear", TILE, TILE, 8, TILE // 16, seam_fix, args.denoise, 8,
                                    TILE // 8, TILE // 32,
                                    True, False, 1)
        else:
            (latent,) = nodes.VAEEncodeTiled().encode(vae, upscaled, 512, 64)
            h, w = upscaled.shape[1:3]
            plan = WindowPlanner.execute(w, h, WINDOW, WINDOW, STRIDE, "first", 0, "uniform", latent=latent).args[0]
            sync = guide = None
            if args.method == "controlsync_guide_sync":
                sync = AnchorSync.execute(vae, 20.0, 0.95, 10, "vgg", "exact", "half", "vae", "run").args[0]
                guide = ControlSyncLowPass.execute(image, vae, "replacement", "latent", 1.0).args[0]
            sampled = ControlSyncSampler.execute(model, SEED, args.steps, CFG, "euler", "normal", pos, neg, latent,
                                                 plan, args.denoise, 0, sync, guide).args[0]
            (out,) = nodes.VAEDecodeTiled().decode(vae, sampled, 512, 64)
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    torch.save(out.clone(), args.row_out + ".pt")
    Path(args.row_out + ".json").write_text(json.dumps({
        "seconds": seconds, "peak_rss_mib": peak / 1024, "rss_before_mib": before / 1024,
        "model_pixels": sum(record), "evaluations": len(record)}))


def borders(length: int, starts, size: int) -> list[int]:
    """The pixel boundaries inside a canvas of `length` where tiles or windows starting at `starts` begin or end."""
    return sorted({b for s in starts for b in (s, s + size) if 0 < b < length})


def window_starts(length: int) -> list[int]:
    from controlsync.sampling.plans import window_starts as starts
    return [s * 8 for s in starts(length // 8, WINDOW // 8, STRIDE // 8)]


def tile_starts(length: int) -> list[int]:
    return list(range(0, length, TILE))


def metrics(out, image, upscaled, lpips_net) -> dict:
    """The columns for one result (out, upscaled: (1, H, W, 3) in [0, 1]; image: the input)."""
    import torch
    import torch.nn.functional as F
    from controlsync.sampling.metrics import grid_seam_score, psnr, tile_colour_drift
    result = out[0].movedim(-1, 0).double()
    H, W = result.shape[-2:]
    low = F.interpolate(result[None], size=tuple(image.shape[1:3]), mode="area")[0]
    reference = image[0].movedim(-1, 0).double()
    tiles_y, tiles_x = tile_starts(H), tile_starts(W)
    with torch.no_grad():
        perceptual = float(lpips_net(low[None].float(), reference[None].float(), normalize=True))
    return {
        "seam_tiles": grid_seam_score(result, borders(H, tiles_y, TILE), borders(W, tiles_x, TILE)),
        "seam_windows": grid_seam_score(result, borders(H, window_starts(H), WINDOW), borders(W, window_starts(W), WINDOW)),
        "psnr": psnr(low, reference, peak=1.0), "lpips": perceptual,
        "drift": tile_colour_drift(result, upscaled[0].movedim(-1, 0).double(),
                                   [(y, x, min(TILE, H - y), min(TILE, W - x)) for y in tiles_y for x in tiles_x]),
    }


def border_steps(image, axis: int):
    """Per boundary b (between pixels b - 1 and b): mean |step| across it, over the image's mean neighbour step."""
    down = (image[..., 1:, :] - image[..., :-1, :]).abs().mean(dim=(0, 2))
    right = (image[..., 1:] - image[..., :-1]).abs().mean(dim=(0, 1))
    interior = float(__import__("torch").cat([down, right]).mean())
    return (down if axis == 0 else right) / interior


def picture(results: dict, image, upscaled, scale: int, path: Path) -> None:
    """Input | ControlSync (shipped set-up) | USDU (no seam fix) | USDU (Half Tile + Intersections): a crop around
    USDU's first tile corner at full resolution, each panel contrast-stretched (the random VAE's output is nearly
    grey); borders whose step across is over 1.5x the image's mean neighbour step are marked red (USDU's tile
    borders) or cyan (ControlSync's window borders)."""
    import numpy as np
    from PIL import Image, ImageDraw
    crop = min(384, 2 * TILE)
    c0 = TILE - crop // 2
    short = {"controlsync_guide_sync": "ControlSync (the workflow's set-up)", "usdu_none": "USDU, no seam fix",
             "usdu_half_tile": "USDU, Half Tile + Intersections"}
    panels = [(f"input, lanczos {scale}x", upscaled[0])] + [(short[m], results[m][0]) for m in short]
    tiles = Image.new("RGB", (crop * len(panels) + 8 * (len(panels) - 1), crop + 22), "white")
    draw = ImageDraw.Draw(tiles)
    for k, (label, full) in enumerate(panels):
        chw = full.movedim(-1, 0).double()
        part = chw[:, c0:c0 + crop, c0:c0 + crop]
        lo, hi = float(part.quantile(0.01)), float(part.quantile(0.99))
        shown = ((part - lo) / max(hi - lo, 1e-6)).clamp(0, 1)
        panel = Image.fromarray((shown.movedim(0, -1).numpy() * 255).astype(np.uint8))
        marks = ImageDraw.Draw(panel)
        if k > 0:
            H, W = chw.shape[-2:]
            for axis in (0, 1):
                steps = border_steps(chw, axis)
                for colour, lines in (("cyan", borders((H, W)[axis], window_starts((H, W)[axis]), WINDOW)),
                                      ("red", borders((H, W)[axis], tile_starts((H, W)[axis]), TILE))):
                    for b in lines:
                        if c0 < b < c0 + crop and float(steps[b - 1]) > 1.5:
                            p = b - c0
                            marks.line([(0, p), (crop, p)] if axis == 0 else [(p, 0), (p, crop)], fill=colour, width=1)
        x = k * (crop + 8)
        tiles.paste(panel, (x, 22))
        draw.text((x + 2, 4), label, fill="black")
    tiles.save(path, quality=82)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--input", type=int, default=256, help="the input's side in px (default 256)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--denoise", type=float, default=0.45)
    ap.add_argument("--tile", type=int, default=256, help="USDU's tile and ControlSync's window in px (stride 3/4 of it)")
    ap.add_argument("--out", default=str(TESTS / ".cache" / "benchmark_upscale"))
    ap.add_argument("--picture", default=str(PICTURE), help="where to write the side-by-side picture ('' for none)")
    ap.add_argument("--from-saved", action="store_true",
                    help="no sampling: the table and picture from the results a previous run saved in --out")
    ap.add_argument("--row", nargs=2, metavar=("SCALE", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--row-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global TILE, WINDOW, STRIDE
    TILE, WINDOW, STRIDE = args.tile, args.tile, args.tile * 3 // 4
    if args.row:
        args.scale, args.method = int(args.row[0]), args.row[1]
        run_row(args)
        return 0

    import torch
    from comfy_host import find_host, import_host
    import_host(find_host())
    import nodes
    import lpips_weights
    from controlsync.sampling.perceptual import build_lpips
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    lpips_net = build_lpips("alex", str(lpips_weights.use_cached_backbones() / lpips_weights.BACKBONE_FILES["alex"]))
    image = load_input(args.input)
    rows, outputs = [], {}
    for scale in args.scales:
        with torch.inference_mode():
            (upscaled,) = nodes.ImageScaleBy().upscale(image, "lanczos", float(scale))
        for method in METHODS:
            stem = str(out_dir / f"{scale}x_{method}")
            cmd = [sys.executable, __file__, "--row", str(scale), method, "--row-out", stem, "--input", str(args.input),
                   "--steps", str(args.steps), "--denoise", str(args.denoise), "--tile", str(args.tile)]
            if not args.from_saved:
                subprocess.run(cmd, check=True)
            numbers = json.loads(Path(stem + ".json").read_text())
            out = torch.load(stem + ".pt")
            outputs[(scale, method)] = out
            numbers.update(metrics(out, image, upscaled, lpips_net))
            rows.append({"scale": scale, "method": method, **numbers})
            print(json.dumps(rows[-1]), flush=True)
        if args.picture and scale == max(args.scales):
            picture({m: outputs[(scale, m)] for m in METHODS}, image, upscaled, scale, Path(args.picture))
    side = args.input
    header = (f"{datetime.date.today()}, {platform.node()} ({platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, {os.environ.get('OMP_NUM_THREADS', '?')} thread(s)), torch {torch.__version__}: "
              f"{side} px input, {args.steps} steps at denoise {args.denoise}, euler, cfg {CFG}, tiny random-weight models")
    print(header)
    lines = ["| scale | method | seam at tile borders | seam at window borders | PSNR of H(result) (dB) | LPIPS of "
             "H(result) | colour drift between tiles | seconds | peak RSS over the loaded models (MiB) | "
             "model-pixels per step | seconds per G model-pixels |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        work = r["model_pixels"] / 1e9
        per_step = "-" if not work else f"{r['model_pixels'] / args.steps / 1e6:.2f} M"
        rate = "-" if not work else f"{r['seconds'] / work:.1f}"
        lines.append(f"| {r['scale']}x ({side * r['scale']} px) | {LABELS[r['method']]} | {r['seam_tiles']:.2f} | "
                     f"{r['seam_windows']:.2f} | {r['psnr']:.2f} | {r['lpips']:.3f} | {r['drift']:.4f} | "
                     f"{r['seconds']:.1f} | {r['peak_rss_mib'] - r['rss_before_mib']:.0f} | {per_step} | {rate} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
