"""Benchmark (not a test): AnchorSync's cost and effect, measured side by side in one run.

    ~/comfy/venv/bin/python tests/benchmark_sync.py [--steps 50] [--sync-steps 10] [--windows 3 7 21]

For each window count: sampling time and peak memory without sync, with exact sync (gradient through
CFG, ControlNet, UNet, VAE; LPIPS-VGG), with the fast mode (model Jacobian skipped) and with the loss
looked at through TAESD (a seeded random TAESD decoder of the real architecture), sync on the
first 10 of 50 steps as in the papers; plus coherence: mean LPIPS of every window to the anchor window
in the decoded result. Each configuration runs in a fresh process (peak RSS is per process).
Tiny random-weight models: the ratios measure the mechanism's overhead, not image quality.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

LPIPS_DIR = Path(__file__).resolve().parent / ".cache" / "lpips"
MODES = ("off", "exact", "fast", "taesd")


def taesd_folder(tm) -> Path:
    """A seeded random TAESD decoder (the real architecture) where ComfyUI's TAESD previews look."""
    import comfy.taesd.taesd
    import comfy.utils
    folder = Path(__file__).resolve().parent / ".cache" / "vae_approx"
    if not (folder / "taesd_decoder.safetensors").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        decoder = comfy.taesd.taesd.Decoder(4)
        tm._init_weights(decoder, 9)
        comfy.utils.save_torch_file(decoder.state_dict(), str(folder / "taesd_decoder.safetensors"))
    return folder


def child(args):
    import torch
    from benchmark_windows import PeakRSS
    from comfy_host import find_host, import_host
    import_host(find_host(), cpu=args.device == "cpu")
    import folder_paths
    import lpips_weights
    import nodes
    import tiny_models as tm
    from controlsync.nodes import bridge
    from controlsync.nodes.anchor_sync import AnchorSync
    from controlsync.nodes.controlsync_sampler import ControlSyncSampler
    from controlsync.nodes.window_planner import WindowPlanner
    lpips_weights.write_lpips_backbones(LPIPS_DIR)
    folder_paths.add_model_folder_path("lpips", str(LPIPS_DIR))
    win, stride = args.window, args.window // 2
    width = win + (args.count - 1) * stride
    with torch.inference_mode():
        model, cn, vae = tm.tiny_model(0), tm.tiny_controlnet(1), tm.tiny_vae()
        image = tm.condition_image(win, width)
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(tm.text_cond(1), tm.text_cond(2), cn, image, 1.0, 0.0, 1.0)
        plan = WindowPlanner.execute(width, win, win, win, stride, "first", 0, "uniform").args[0]
        sync = None
        if args.mode != "off":
            if args.mode == "taesd":
                folder_paths.add_model_folder_path("vae_approx", str(taesd_folder(tm)))
            sync = AnchorSync.execute(vae, 20.0, 0.95, args.sync_steps, args.net,
                                      "skip model Jacobian" if args.mode == "fast" else "exact", "full",
                                      "taesd" if args.mode == "taesd" else "vae").args[0]
        latent = {"samples": torch.zeros(1, 4, win // 8, width // 8)}
        if sync is not None:
            bridge.load_lpips(args.net, "cpu")  # loaded once per session in real use: not part of a run's peak
        with PeakRSS() as rss:
            start = time.perf_counter()
            out = ControlSyncSampler.execute(model, 1, args.steps, 7.5, "ddim", "ddim_uniform", pos, neg, latent, plan,
                                             1.0, 0, sync).args[0]["samples"]
            seconds = time.perf_counter() - start
        images = vae.decode(out).movedim(-1, 1) * 2 - 1
    lpips = bridge.load_lpips(args.net, "cpu")
    layout = plan.layout((win // 8, width // 8), 8)
    crops = [images[..., r.rect[0] * 8:(r.rect[0] + r.rect[2]) * 8, r.rect[1] * 8:(r.rect[1] + r.rect[3]) * 8]
             for r in layout.regions]
    with torch.no_grad():
        drift = [float(lpips(c, crops[layout.anchor])) for i, c in enumerate(crops) if i != layout.anchor]
    print(json.dumps({"seconds": seconds, "rss_growth_mib": rss.growth_mib, "lpips_to_anchor": sum(drift) / len(drift)}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sync-steps", type=int, default=10)
    p.add_argument("--windows", type=int, nargs="+", default=[3, 7, 21])
    p.add_argument("--window", type=int, default=64, help="window side in px (tiny models: 64)")
    p.add_argument("--net", default="vgg", choices=["vgg", "alex"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="off", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    import torch
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, device {args.device}")
    print(f"tiny SD1.5-architecture UNet + ControlNet + VAE, ddim/ddim_uniform {args.steps} steps, cfg 7.5, "
          f"sync {args.sync_steps} of 50 (w 20, decay 0.95), LPIPS-{args.net}, windows {args.window} px stride {args.window // 2}")
    print(f"{'windows':>7} {'mode':>6} {'time s':>8} {'x off':>6} {'RSS +MiB':>9} {'LPIPS to anchor':>16}")
    for count in args.windows:
        rows = {}
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", "--count", str(count), "--mode", mode, "--steps", str(args.steps),
                   "--sync-steps", str(args.sync_steps), "--window", str(args.window), "--net", args.net,
                   "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("{")]
            if not line:
                sys.exit(out.stderr[-3000:])
            rows[mode] = json.loads(line[-1])
        for mode, row in rows.items():
            print(f"{count:7d} {mode:>6} {row['seconds']:8.2f} {row['seconds'] / rows['off']['seconds']:6.2f} "
                  f"{row['rss_growth_mib']:9.1f} {row['lpips_to_anchor']:16.4f}")


if __name__ == "__main__":
    main()
