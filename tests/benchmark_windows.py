"""Benchmark (not a test): ControlSyncSampler against ComfyUI's KSampler, measured side by side.

    ~/comfy/venv/bin/python tests/benchmark_windows.py [--channels 64] [--steps 4] [--repeats 3] [--device cpu|cuda]
                                                      [--dtype fp32|fp16|bf16]

Prints (a) the overhead of a one-window plan over KSampler, (b) batched vs sequential windows,
(c) peak memory against window count. Runs alternate between the compared variants and report
medians, so load on the shared machine hits both alike.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def setup(args):
    from comfy_host import find_host, host_version, import_host
    host = find_host()
    if host is None:
        sys.exit("no ComfyUI host found (set COMFYUI_PATH or run setup_comfyui_host.sh)")
    return host, host_version(host), import_host(host, cpu=args.device == "cpu")


def unet_controlnet(tm, dtype):
    """tiny_models' SD1.5 UNet and ControlNet (same configs and seeds) in `dtype`, loaded by ComfyUI onto its device
    (the GPU with --device cuda). tiny_models fixes float32 on the CPU; here the dtype goes in at construction,
    as ComfyUI's loaders do for fp16/bf16 checkpoints (set_inference_dtype, the ControlNet's dtype)."""
    import torch
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops
    import comfy.supported_models
    dev, cpu = comfy.model_management.get_torch_device(), torch.device("cpu")
    config = comfy.supported_models.SD15(dict(tm.SD15_UNET))
    config.set_inference_dtype(dtype, None)
    unet = config.get_model({}, device="cpu")
    tm._init_weights(unet.diffusion_model, 0)
    cn_config = {k: v for k, v in tm.SD15_UNET.items() if k not in ("out_channels", "transformer_depth_output",
                                                                     "use_temporal_resblock", "use_temporal_attention")}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=dtype,
                                     device="cpu", **cn_config)
    tm._init_weights(net, 1)
    return (comfy.model_patcher.ModelPatcher(unet, load_device=dev, offload_device=cpu),
            comfy.controlnet.ControlNet(net, load_device=dev))


def build(args):
    """The benchmark model and ControlNet, and a function giving CONDITIONING for a condition image."""
    import torch
    import nodes
    import tiny_models as tm
    tm.SD15_UNET.update(model_channels=args.channels, channel_mult=[1, 2, 4], num_res_blocks=[1, 1, 1],
                        transformer_depth=[1, 1, 1], transformer_depth_output=[1, 1, 1, 1, 1, 1])
    with torch.inference_mode():
        model, cn = unet_controlnet(tm, getattr(torch, DTYPES[args.dtype]))

    def conds(height, width):
        with torch.inference_mode():
            return nodes.ControlNetApplyAdvanced().apply_controlnet(tm.text_cond(1), tm.text_cond(2), cn,
                                                                    tm.condition_image(height, width), 1.0, 0.0, 1.0)
    return model, conds


class PeakRSS:
    """Peak resident memory above the level at entry, polled from /proc every 2 ms (ru_maxrss cannot be
    reset, and the models built before the run already set it)."""

    def __enter__(self):
        import threading
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _poll(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth_mib(self):
        return (self.peak - self.start) / 2**20


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def alternate(variants: dict, repeats: int) -> dict:
    times = {k: [] for k in variants}
    for fn in variants.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def sampler_runs(model):
    import torch
    import nodes
    from controlsync.nodes.controlsync_sampler import ControlSyncSampler

    def ksampler(conds, latent, steps):
        with torch.inference_mode():
            nodes.common_ksampler(model, 1, steps, 7.5, "euler", "normal", *conds, latent)

    def controlsync(conds, latent, plan, batch, steps):
        with torch.inference_mode():
            ControlSyncSampler.execute(model, 1, steps, 7.5, "euler", "normal", *conds, latent, plan, 1.0, batch)
    return ksampler, controlsync


def bench_time(args):
    import torch
    from controlsync.nodes.window_planner import WindowPlanner
    model, conds = build(args)
    ksampler, controlsync = sampler_runs(model)
    win, lat = args.window, args.window // 8
    square, square_conds = {"samples": torch.zeros(1, 4, lat, lat)}, conds(win, win)
    one = WindowPlanner.execute(win, win, win, win, 64, "first", 0, "uniform").args[0]
    a = alternate({"KSampler": lambda: ksampler(square_conds, square, args.steps),
                   "ControlSync one window": lambda: controlsync(square_conds, square, one, 0, args.steps)}, args.repeats)
    wide, wide_conds = {"samples": torch.zeros(1, 4, lat, args.canvas_width // 8)}, conds(win, args.canvas_width)
    plan = WindowPlanner.execute(args.canvas_width, win, win, win, args.stride, "first", 0, "uniform").args[0]
    n = len(plan.layout((lat, args.canvas_width // 8), 8).regions)
    b = alternate({"sequential (batch 1)": lambda: controlsync(wide_conds, wide, plan, 1, args.steps),
                   f"batched ({n} per call)": lambda: controlsync(wide_conds, wide, plan, n, args.steps)}, args.repeats)
    return a, b, n


def peak_memory_child(args):
    """Runs in a fresh process: one sampling run with `args.windows` windows; prints its peak memory."""
    import torch
    from controlsync.nodes.window_planner import WindowPlanner
    model, conds = build(args)
    _, controlsync = sampler_runs(model)
    win = args.window
    width = win + (args.windows - 1) * args.stride
    plan = WindowPlanner.execute(width, win, win, win, args.stride, "first", 0, "uniform").args[0]
    latent, wide_conds = {"samples": torch.zeros(1, 4, win // 8, width // 8)}, conds(win, width)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        controlsync(wide_conds, latent, plan, args.batch, 2)
    gpu = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
    print(json.dumps({"windows": args.windows, "rss_growth_mib": rss.growth_mib, "gpu_peak_mib": gpu}))


def bench_memory(args):
    rows = []
    for windows in (1, 3, 7, 13):
        for batch in (1, windows):
            cmd = [sys.executable, __file__, "--child", "--windows", str(windows), "--batch", str(batch),
                   "--channels", str(args.channels), "--stride", str(args.stride), "--window", str(args.window),
                   "--device", args.device, "--dtype", args.dtype]
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            line = [l for l in out.stdout.splitlines() if l.startswith("{")]
            if not line:
                sys.exit(out.stderr[-2000:])
            row = json.loads(line[-1])
            row["batch"] = str(batch)
            rows.append(row)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--channels", type=int, default=64, help="UNet model_channels of the benchmark model")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window", type=int, default=256, help="window side in px")
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--canvas-width", type=int, default=1024)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="UNet and ControlNet weights and compute")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--windows", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    host, version, _ = setup(args)
    if args.child:
        return peak_memory_child(args)
    import torch
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"device {args.device}; ComfyUI {version} at {host}")
    print(f"model: SD1.5-architecture UNet, model_channels {args.channels}, + ControlNet ({args.dtype}); "
          f"euler, {args.steps} steps, cfg 7.5")
    a, b, n = bench_time(args)
    print(f"\n(a) one {args.window}x{args.window} window vs KSampler (median of alternating runs)")
    for k, v in a.items():
        print(f"    {k:28s} {v:7.3f} s")
    print(f"    overhead: {100 * (a['ControlSync one window'] / a['KSampler'] - 1):+.1f} %")
    print(f"\n(b) {args.window}x{args.canvas_width} canvas, {n} windows of {args.window} px, stride {args.stride}")
    for k, v in b.items():
        print(f"    {k:28s} {v:7.3f} s")
    batched = [v for k, v in b.items() if k.startswith("batched")][0]
    print(f"    batched / sequential: {batched / b['sequential (batch 1)']:.2f}x time "
          f"(window_batch_size 0 picks 1 on the CPU, as many as memory allows on a GPU)")
    print("\n(c) peak memory growth of one 2-step run (fresh process each)")
    for row in bench_memory(args):
        gpu = f", GPU peak {row['gpu_peak_mib']:.0f} MiB" if row["gpu_peak_mib"] is not None else ""
        print(f"    {row['windows']:3d} windows, batch {row['batch']:4s}: RSS +{row['rss_growth_mib']:7.1f} MiB{gpu}")


if __name__ == "__main__":
    main()
