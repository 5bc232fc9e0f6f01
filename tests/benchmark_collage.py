"""Benchmark (not a test): DiffCollage against its baselines on a 6:1 canvas, side by side in one run.

    ~/comfy/venv/bin/python tests/benchmark_collage.py [--steps 10] [--repeats 3] [--window 256]
                                                       [--device cpu|cuda] [--dtype fp32|fp16|bf16] [--full]

As in the DiffCollage paper's table (times 5.61 / 6.47 / 14.99 / 26.43): a long image, 6 windows wide,
made by
  independent     6 windows side by side, no overlap, sampled together (no interaction at all);
  DiffCollage     a chain of half-overlapping factors (11 + 10 overlaps), all denoised every step;
  AR Replacement  the same 11 factors one after another, each a full sampling run outpainting the
                  previous one's overlap with ComfyUI's noise mask;
  AR Reconstruction  the same, the overlap kept by Reconstruction guidance (a backward pass per step).
All through ControlSyncSampler with a ControlNet, euler, cfg 7.5; runs alternate and the medians are
compared. Random-weight models: the SD1.5-sized UNet and ControlNet with --full (needs a GPU to be
quick), else a small one (--channels). Window batch: automatic (all regions of a size per call on a
GPU, one at a time on the CPU, where batching does not pay).
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmark_windows as bw  # noqa: E402

SD15_FULL = dict(model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2],
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                 transformer_depth_middle=1, num_heads=8, num_head_channels=-1, context_dim=768)


def build(args):
    import torch
    import nodes
    import tiny_models as tm
    if args.full:
        tm.SD15_UNET.update(SD15_FULL)
    else:
        tm.SD15_UNET.update(model_channels=args.channels, channel_mult=[1, 2, 4], num_res_blocks=[1, 1, 1],
                            transformer_depth=[1, 1, 1], transformer_depth_output=[1, 1, 1, 1, 1, 1])
    dtype = getattr(torch, bw.DTYPES[args.dtype])
    with torch.inference_mode():
        model, cn = bw.unet_controlnet(tm, dtype)
    context = tm.SD15_UNET["context_dim"]
    g = torch.Generator().manual_seed(1)
    text = [[[torch.randn(1, 77, context, generator=g), {}]] for _ in range(2)]
    params = sum(p.numel() for p in model.model.diffusion_model.parameters())

    def conds(height, width):
        with torch.inference_mode():
            return nodes.ControlNetApplyAdvanced().apply_controlnet(text[0], text[1], cn, tm.condition_image(height, width),
                                                                    1.0, 0.0, 1.0)
    return model, conds, params


def plans(win, width):
    from controlsync.nodes.factor_graph_collage import FactorGraphCollage
    from controlsync.nodes.window_planner import WindowPlanner

    def chain(**kw):
        return FactorGraphCollage.execute("chain", width, win, win, win, win // 2, "horizontal", 0, **kw).args[0]
    return {
        "independent": WindowPlanner.execute(width, win, win, win, win, "first", 0, "uniform").args[0],
        "DiffCollage": chain(),
        "AR Replacement": chain(order="autoregressive"),
        "AR Reconstruction": chain(order="autoregressive", known_pixels="reconstruction"),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--window", type=int, default=256, help="window side in px (the canvas is 6 windows wide)")
    p.add_argument("--channels", type=int, default=32, help="UNet model_channels of the small model")
    p.add_argument("--full", action="store_true", help="SD1.5-sized UNet and ControlNet (random weights)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(bw.DTYPES), default="fp32")
    args = p.parse_args()
    host, version, _ = bw.setup(args)
    import torch
    from controlsync.nodes.controlsync_sampler import ControlSyncSampler
    model, conds, params = build(args)
    win, width = args.window, 6 * args.window
    latent = {"samples": torch.zeros(1, 4, win // 8, width // 8)}
    canvas_conds = conds(win, width)

    def run(plan):
        def go():
            with torch.inference_mode():
                ControlSyncSampler.execute(model, 1, args.steps, 7.5, "euler", "normal", *canvas_conds, latent, plan, 1.0, 0)
            if args.device == "cuda":
                torch.cuda.synchronize()
        return go
    times = bw.alternate({name: run(plan) for name, plan in plans(win, width).items()}, args.repeats)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"ComfyUI {version} at {host}; torch {torch.__version__}; {device}; {args.dtype}")
    print(f"UNet {params / 1e6:.0f} M parameters ({'SD1.5 size' if args.full else f'{args.channels} channels'}); "
          f"canvas {width}x{win} px (6:1), windows {win} px, {args.steps} euler steps, cfg 7.5, ControlNet; "
          f"median of {args.repeats}")
    base = times["independent"]
    print(f"{'method':<20} {'seconds':>9} {'x independent':>14}")
    for name, t in times.items():
        print(f"{name:<20} {t:9.2f} {t / base:14.2f}")
    d = times["DiffCollage"]
    print(f"DiffCollage: {d / base:.2f}x independent windows (paper 1.15x), {times['AR Replacement'] / d:.2f}x faster "
          f"than AR Replacement (paper 2.32x), {times['AR Reconstruction'] / d:.2f}x faster than AR Reconstruction "
          f"(paper 4.08x)")


if __name__ == "__main__":
    main()
