"""Benchmark (not a test): AnchorSync's cost and effect, measured side by side in one run.

    ~/comfy/venv/bin/python tests/benchmark_sync.py [--steps 50] [--sync-steps 10] [--windows 3 7 21]
                                                   [--device cpu|cuda] [--dtype fp32|fp16|bf16]

For each window count: sampling time and peak memory without sync, with exact sync (gradient through
CFG, ControlNet, UNet, VAE; LPIPS-VGG), with the fast mode (model Jacobian skipped) and with the loss
looked at through TAESD (a seeded random TAESD decoder of the real architecture), sync on the
first 10 of 50 steps as in the papers; plus coherence: mean LPIPS of every window to the anchor window
in the decoded result. Each configuration runs in a fresh process (peak RSS is per process); on a GPU
after a short untimed warm-up run.
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

from benchmark_windows import DTYPES  # noqa: E402

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


def tiny_vae(tm, dtype, device):
    """tiny_models.tiny_vae (same config and seed) with comfy.sd.VAE's own dtype and device (tiny_vae fixes
    float32 on the CPU)."""
    import comfy.sd
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    return comfy.sd.VAE(sd=tm.tiny_vae().first_stage_model.state_dict(), device=device, dtype=dtype,
                        config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})


def child(args):
    import torch
    from benchmark_windows import PeakRSS, unet_controlnet
    from comfy_host import find_host, import_host
    import_host(find_host(), cpu=args.device == "cpu")
    import comfy.model_management
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
    dev, dtype = comfy.model_management.get_torch_device(), getattr(torch, DTYPES[args.dtype])
    cuda = args.device == "cuda"
    with torch.inference_mode():
        model, cn = unet_controlnet(tm, dtype)
        vae = tiny_vae(tm, dtype, dev)
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
            with torch.inference_mode(False):  # as the sync loads it: inference-mode weights can't take autograd
                bridge.load_lpips(args.net, dev)  # loaded once per session in real use: not part of a run's peak

        def run(steps):
            return ControlSyncSampler.execute(model, 1, steps, 7.5, "ddim", "ddim_uniform", pos, neg, latent, plan,
                                              1.0, 0, sync).args[0]["samples"]
        if cuda:  # CUDA's lazy start-up (context, kernels, cuBLAS/cuDNN handles) is no cost of the mechanism: a short
            # untimed run first, with enough steps for one synced step (round(sync_steps * N / 50) >= 1)
            run(min(args.steps, 25 // max(args.sync_steps, 1) + 1))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        gpu_start = torch.cuda.memory_allocated() if cuda else 0
        with PeakRSS() as rss:
            start = time.perf_counter()
            out = run(args.steps)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        gpu = (torch.cuda.max_memory_allocated() - gpu_start) / 2**20 if cuda else None
        images = vae.decode(out).movedim(-1, 1) * 2 - 1
    lpips = bridge.load_lpips(args.net, "cpu")
    layout = plan.layout((win // 8, width // 8), 8)
    crops = [images[..., r.rect[0] * 8:(r.rect[0] + r.rect[2]) * 8, r.rect[1] * 8:(r.rect[1] + r.rect[3]) * 8]
             for r in layout.regions]
    with torch.no_grad():
        drift = [float(lpips(c, crops[layout.anchor])) for i, c in enumerate(crops) if i != layout.anchor]
    print(json.dumps({"seconds": seconds, "rss_growth_mib": rss.growth_mib, "gpu_growth_mib": gpu,
                      "lpips_to_anchor": sum(drift) / len(drift)}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sync-steps", type=int, default=10)
    p.add_argument("--windows", type=int, nargs="+", default=[3, 7, 21])
    p.add_argument("--window", type=int, default=64, help="window side in px (tiny models: 64)")
    p.add_argument("--net", default="vgg", choices=["vgg", "alex"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES),
                   help="UNet, ControlNet and VAE (LPIPS stays fp32)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="off", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    import torch
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, device {args.device}")
    print(f"tiny SD1.5-architecture UNet + ControlNet + VAE ({args.dtype}), ddim/ddim_uniform {args.steps} steps, cfg 7.5, "
          f"sync {args.sync_steps} of 50 (w 20, decay 0.95), LPIPS-{args.net}, windows {args.window} px stride {args.window // 2}")
    gpu = args.device == "cuda"
    print(f"{'windows':>7} {'mode':>6} {'time s':>8} {'x off':>6} {'RSS +MiB':>9}{' GPU +MiB' if gpu else ''} "
          f"{'LPIPS to anchor':>16}")
    for count in args.windows:
        rows = {}
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", "--count", str(count), "--mode", mode, "--steps", str(args.steps),
                   "--sync-steps", str(args.sync_steps), "--window", str(args.window), "--net", args.net,
                   "--device", args.device, "--dtype", args.dtype]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("{")]
            if not line:
                sys.exit(out.stderr[-3000:])
            rows[mode] = json.loads(line[-1])
        for mode, row in rows.items():
            gpu_mib = f" {row['gpu_growth_mib']:8.1f}" if gpu else ""
            print(f"{count:7d} {mode:>6} {row['seconds']:8.2f} {row['seconds'] / rows['off']['seconds']:6.2f} "
                  f"{row['rss_growth_mib']:9.1f}{gpu_mib} {row['lpips_to_anchor']:16.4f}")


if __name__ == "__main__":
    main()
