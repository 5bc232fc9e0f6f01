"""Benchmark (not a test): AnchorSync's cost and effect, measured side by side in one run, next to the bound.

    ~/comfy/venv/bin/python tests/benchmark_sync.py [--windows 3 7 21] [--steps 50] [--sync-steps 10]
                                                   [--device cpu|cuda] [--dtype fp32|fp16|bf16]
    python tests/benchmark_sync.py --paper --device cuda --dtype fp16     # the paper's setting, on a GPU
    ~/comfy/venv/bin/python tests/benchmark_sync.py --measure-loss-memory  # the loss's bytes per decoded pixel

For each plan: the unsynced run's time, and for each sync mode (exact: the gradient through CFG, the
ControlNet, the UNet and the decoder; fast: the gradient through the decoder and LPIPS only, plus one more
forward evaluation per window for the model's slope) its time ratio to the unsynced run, its peak memory, and the coherence it buys
(mean LPIPS of every window to the anchor window in the decoded result), ddim 50 steps with the papers'
sync (w 20, decay 0.95, the first 10 of 50 steps).

Next to each measured ratio, the bound: the same run's cost computed from per-call times of its parts,
measured here at the batch sizes the run uses - the UNet + ControlNet forward and backward of a gradient
batch (fast: its forward), the decoder's forward and backward, LPIPS's forward and backward, the anchor's
decode - added to the
unsynced run: what a perfect implementation of that mode would take. `measured / bound` near 1 means the
mode spends nothing beyond its unavoidable work.

Models: tiny random-weight SD1.5-architecture UNet + ControlNet + VAE by default (the CPU); --full (implied
by --paper) an SD1.5-sized UNet + ControlNet (860 M) and an SD-sized VAE decoder, random weights; --paper
the papers' 512x3072 canvas with 512 px windows at stride 64 (41 windows) and 128 (21). Each row runs in a
fresh process (peak memory is per process); on a GPU after an untimed warm-up.
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

MODES = ("off", "exact", "fast")
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
TINY_VAE = dict(SD_VAE, ch=32, ch_mult=[1, 1, 1, 1], num_res_blocks=1)


def make_vae(tm, full, dtype, device):
    """An SD-layout VAE (SD-sized with `full`, else tiny_models' tiny one) with comfy.sd.VAE's own dtype and device."""
    import torch
    import comfy.ldm.models.autoencoder
    import comfy.sd
    ddconfig = SD_VAE if full else TINY_VAE
    net = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    tm._init_weights(net, 5)
    with torch.inference_mode():
        return comfy.sd.VAE(sd=net.state_dict(), device=device, dtype=dtype,
                            config={"params": {"ddconfig": ddconfig, "embed_dim": 4}})


def timed(fn, cuda, repeats=3):
    import statistics
    import torch
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def part_times(model, cn, vae, loss_net, pos, neg, window_cells, batch, cuda, dtype):
    """Seconds per call of each part at `batch` windows: UNet + ControlNet forward (cond and uncond batched),
    the same forward and backward, the decoder's forward and backward, LPIPS forward and backward, and one
    decode (the anchor's image)."""
    import torch
    import comfy.model_management
    dev = comfy.model_management.get_torch_device()
    base = model.model
    comfy.model_management.load_models_gpu([model, vae.patcher])
    h = w = window_cells
    px = h * 8
    ctx = torch.cat([neg[0][0], pos[0][0]]).to(dev, dtype).repeat_interleave(batch, 0)
    t = torch.full((2 * batch,), 5.0, device=dev)
    patches = {"patches": {"input_block_patch_after_skip": [lambda hh, o: hh.clone()]}}
    control = cn.copy()  # ComfyUI's own ControlNet path, fed `batch` window-sized hints
    control.set_cond_hint(torch.rand(batch, 3, px, px), 1.0, (0.0, 1.0))
    control.pre_run(base, lambda percent: 0.0)

    def unet(x):
        xx = torch.cat([x, x])
        ctrl = control.get_control(xx, t, {"c_crossattn": ctx}, 2, patches)
        return base.apply_model(xx, t, c_crossattn=ctx, control=ctrl, transformer_options=patches)

    def decode(z):
        return vae.first_stage_model.decode(z.to(vae.vae_dtype))

    x = torch.randn(batch, 4, h, w, device=dev, dtype=dtype)
    images = torch.rand(batch, 3, px, px, device=dev)
    results = {}
    with torch.inference_mode(False), torch.enable_grad():
        from controlsync.nodes.bridge import differentiable
        with differentiable([base.diffusion_model, control.control_model, vae.first_stage_model]):
            results["unet_fwd"] = timed(lambda: torch.no_grad()(unet)(x), cuda)

            def unet_fwd_bwd():
                xg = x.clone().requires_grad_(True)
                torch.autograd.grad(unet(xg).float().sum(), xg)
            results["unet_fwd_bwd"] = timed(unet_fwd_bwd, cuda)

            def decoder_fwd_bwd():
                zg = x.clone().requires_grad_(True)
                torch.autograd.grad(decode(zg).float().sum(), zg)
            results["decoder_fwd_bwd"] = timed(decoder_fwd_bwd, cuda)

            def lpips_fwd_bwd():
                ig = images.clone().requires_grad_(True)
                torch.autograd.grad(loss_net(ig, images.flip(-1), normalize=False).sum(), ig)
            results["lpips_fwd_bwd"] = timed(lpips_fwd_bwd, cuda)
            results["decode_one"] = timed(lambda: torch.no_grad()(decode)(x[:1]), cuda)
    return results


def child(args):
    import torch
    from benchmark_windows import PeakRSS, unet_controlnet
    from comfy_host import find_host, import_host
    import_host(find_host(), cpu=args.device == "cpu")
    import comfy.model_management
    import lpips_weights
    import nodes
    import tiny_models as tm
    from benchmark_collage import SD15_FULL
    from controlsync.nodes import bridge
    from controlsync.nodes.anchor_sync import AnchorSync
    from controlsync.nodes.controlsync_sampler import ControlSyncSampler
    from controlsync.nodes.window_planner import WindowPlanner
    lpips_weights.use_cached_backbones()
    if args.full:
        tm.SD15_UNET.update(SD15_FULL)
        tm.CONTEXT_DIM = SD15_FULL["context_dim"]
    win, stride, width = args.window, args.stride, args.width
    dev, dtype = comfy.model_management.get_torch_device(), getattr(torch, DTYPES[args.dtype])
    cuda = args.device == "cuda"
    with torch.inference_mode():
        model, cn = unet_controlnet(tm, dtype)
        vae = make_vae(tm, args.full, dtype, dev)
        image = tm.condition_image(win, width)
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(tm.text_cond(1), tm.text_cond(2), cn, image, 1.0, 0.0, 1.0)
        plan = WindowPlanner.execute(width, win, win, win, stride, "first", 0, "uniform").args[0]
        sync = None
        if args.mode != "off":
            sync = AnchorSync.execute(vae, 20.0, 0.95, args.sync_steps, args.net,
                                      "skip model Jacobian" if args.mode == "fast" else "exact", "full", "vae").args[0]
        latent = {"samples": torch.zeros(1, 4, win // 8, width // 8)}
    loss_net = bridge.load_lpips(args.net, dev)  # loaded once per session in real use: not part of a run's peak

    def run(steps):
        with torch.inference_mode():
            return ControlSyncSampler.execute(model, 1, steps, 7.5, "ddim", "ddim_uniform", pos, neg, latent, plan,
                                              1.0, 0, sync).args[0]["samples"]
    if cuda:  # CUDA's lazy start-up is no cost of the mechanism: a short untimed run with one synced step first
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
    layout = bridge.layout_for(plan, model, latent["samples"].shape)
    with torch.inference_mode():
        images = vae.decode(out).movedim(-1, 1) * 2 - 1
        crops = [images[..., r.rect[0] * 8:(r.rect[0] + r.rect[2]) * 8, r.rect[1] * 8:(r.rect[1] + r.rect[3]) * 8]
                 for r in layout.regions]
    with torch.no_grad():
        drift = [float(loss_net(c.to(dev, torch.float32), crops[layout.anchor].to(dev, torch.float32)))
                 for i, c in enumerate(crops) if i != layout.anchor]
    result = {"seconds": seconds, "rss_growth_mib": rss.growth_mib, "gpu_growth_mib": gpu,
              "lpips_to_anchor": sum(drift) / len(drift), "windows": len(layout.regions)}
    if args.mode != "off":
        import comfy.sampler_helpers
        batch = 1 if not cuda else bridge.auto_window_batch(
            model.model, layout, [comfy.sampler_helpers.convert_cond(c) for c in (pos, neg)], latent["samples"].shape,
            comfy.model_management.get_free_memory(dev), gradient=True)
        batch = min(batch, len(layout.regions) - 1)
        result["gradient_batch"] = batch
        result["parts"] = part_times(model, cn, vae, loss_net, pos, neg, win // 8, batch, cuda, dtype)
        result["synced_steps"] = sync.schedule.synced_steps(args.steps)
    print(json.dumps(result))


def bound_ratio(off_seconds, row, mode):
    """The unsynced run plus, per synced step, the parts a perfect implementation of `mode` must run."""
    p, batch = row["parts"], row["gradient_batch"]
    batches = -(-(row["windows"] - 1) // batch)
    # exact: the model's forward and backward; fast: its one forward evaluation at the probe latent
    per_batch = p["decoder_fwd_bwd"] + p["lpips_fwd_bwd"] + (p["unet_fwd_bwd"] if mode == "exact" else p["unet_fwd"])
    per_step = batches * per_batch + p["decode_one"]
    return (off_seconds + row["synced_steps"] * per_step) / off_seconds


def measure_loss_memory(args):
    """Peak memory of the loss's forward and backward (decoder + LPIPS) per decoded pixel, SD-sized decoder."""
    import torch
    from benchmark_windows import PeakRSS
    from comfy_host import find_host, import_host
    import_host(find_host(), cpu=args.device == "cpu")
    import comfy.model_management
    import lpips_weights
    import tiny_models as tm
    from controlsync.nodes import bridge
    lpips_weights.use_cached_backbones()
    dev, cuda = comfy.model_management.get_torch_device(), args.device == "cuda"
    vae = make_vae(tm, True, torch.float32, dev)
    loss_net = bridge.load_lpips(args.net, dev)
    side = 32  # latent cells: 256 px
    z = torch.randn(1, 4, side, side, device=dev)
    anchor = torch.rand(1, 3, side * 8, side * 8, device=dev) * 2 - 1
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated() if cuda else 0
    with torch.inference_mode(False), torch.enable_grad(), PeakRSS() as rss:
        with bridge.differentiable([vae.first_stage_model]):
            zg = z.clone().requires_grad_(True)
            image = vae.first_stage_model.decode(zg).clamp(-1, 1)
            torch.autograd.grad(loss_net(image, anchor, normalize=False).sum(), zg)
    peak = (torch.cuda.max_memory_allocated() - start) if cuda else rss.growth_mib * 2**20
    print(f"decoder (SD-sized) + LPIPS-{args.net} forward and backward, fp32, {side * 8}x{side * 8} px on "
          f"{args.device}: {peak / 2**20:.0f} MiB, {peak / (side * 8) ** 2:.0f} bytes per decoded pixel")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sync-steps", type=int, default=10)
    p.add_argument("--windows", type=int, nargs="+", default=[3, 7, 21], help="tiny plans: window counts (stride = window/2)")
    p.add_argument("--window", type=int, default=64, help="window side in px (tiny models: 64)")
    p.add_argument("--paper", action="store_true", help="512x3072, 512 px windows at stride 64 and 128 (implies --full)")
    p.add_argument("--full", action="store_true", help="SD1.5-sized UNet + ControlNet and SD-sized VAE (random weights)")
    p.add_argument("--net", default="vgg", choices=["vgg", "alex"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="UNet, ControlNet and VAE (LPIPS stays fp32)")
    p.add_argument("--measure-loss-memory", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stride", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--width", type=int, default=128, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="off", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure_loss_memory:
        return measure_loss_memory(args)
    if args.child:
        return child(args)
    import torch
    if args.paper:
        args.full, args.window = True, 512
        plans = [(3072, 64), (3072, 128)]
    else:
        plans = [(args.window + (n - 1) * args.window // 2, args.window // 2) for n in args.windows]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, device {args.device}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"{'SD1.5-sized (860 M) UNet + ControlNet, SD-sized VAE' if args.full else 'tiny SD1.5-architecture UNet + ControlNet + VAE'}"
          f" ({args.dtype}), ddim/ddim_uniform {args.steps} steps, cfg 7.5, sync {args.sync_steps} of 50 (w 20, decay 0.95), "
          f"LPIPS-{args.net}, windows {args.window} px")
    gpu = args.device == "cuda"
    print(f"{'canvas':>10} {'stride':>6} {'windows':>7} {'mode':>6} {'time s':>8} {'x off':>6} {'bound':>6} {'x/bound':>7} "
          f"{'grad batch':>10} {'RSS +MiB':>9}{' GPU +MiB' if gpu else ''} {'LPIPS to anchor':>16}")
    for width, stride in plans:
        rows = {}
        for mode in MODES:
            cmd = [sys.executable, __file__, "--child", "--mode", mode, "--steps", str(args.steps), "--sync-steps",
                   str(args.sync_steps), "--window", str(args.window), "--stride", str(stride), "--width", str(width),
                   "--net", args.net, "--device", args.device, "--dtype", args.dtype] + (["--full"] if args.full else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("{")]
            if not line:
                sys.exit(out.stderr[-3000:])
            rows[mode] = json.loads(line[-1])
        off = rows["off"]["seconds"]
        for mode, row in rows.items():
            bound = bound_ratio(off, row, mode) if mode != "off" else 1.0
            gpu_mib = f" {row['gpu_growth_mib']:8.1f}" if gpu else ""
            print(f"{f'{width}x{args.window}':>10} {stride:6d} {row['windows']:7d} {mode:>6} {row['seconds']:8.2f} "
                  f"{row['seconds'] / off:6.2f} {bound:6.2f} {row['seconds'] / off / bound:7.2f} "
                  f"{row.get('gradient_batch', '-'):>10} {row['rss_growth_mib']:9.1f}{gpu_mib} {row['lpips_to_anchor']:16.4f}")


if __name__ == "__main__":
    main()
