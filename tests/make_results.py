"""Regenerates README.md's results section (between the RESULTS markers) and its drift chart:

    ~/comfy/venv/bin/python tests/make_results.py [--samples 1000]

For each method - independent windows, joint averaging (MultiDiffusion), AnchorSync, DiffCollage - on
(1) the analytic global-style test bed (sampling/testbed.py: exact denoisers, known answer) and
(2) tiny random-weight models inside ComfyUI (ControlNet-conditioned, decoded by a tiny VAE),
with fixed seeds. Random weights: part (2) tests the mechanism, not image quality.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
README = TESTS.parent / "README.md"
CHART = TESTS.parent / "nodes" / "web" / "docs" / "results_drift.png"


def test_bed(samples: int) -> list[tuple[str, float]]:
    from comfy_host import load_sampling
    S = load_sampling()
    from controlsync_sampling import testbed as T
    from controlsync_sampling.collage import FactorGraphPlan
    from controlsync_sampling.sync import SyncSchedule
    world = T.GlobalStyleWorld(length=48, tau=1.0, delta=0.3)
    plan = S.WindowPlan((8, 8 * 48), (8, 8 * 16), (8, 8 * 8)).layout((1, 48), 8)
    collage = FactorGraphPlan("chain", (8, 8 * 48), (8, 8 * 16), 8 * 8).layout((1, 48), 8)
    factors = [r for r, f in zip(collage.regions, collage.factors_of) if len(f) == 1]
    g = torch.Generator().manual_seed(7)
    truth = torch.randn(samples, 1, generator=g, dtype=torch.float64) * world.tau + \
        torch.randn(samples, 48, generator=g, dtype=torch.float64) * world.delta

    def spread(canvas, regions=plan.regions):
        return T.style_spread([S.gather(canvas[:, None, None, :], r)[:, 0, 0, :] for r in regions])
    return [("true samples", spread(truth)),
            ("independent windows", T.style_spread(T.sample_independent(world, plan, samples, seed=1))),
            ("joint averaging", spread(T.sample(world, plan, samples, seed=1))),
            ("AnchorSync (w 20, 0.95, 10 of 60 steps)", spread(T.sample(world, plan, samples, seed=1,
                                                                          sync=SyncSchedule(20.0, 0.95, 10, 60)))),
            ("DiffCollage (chain, half overlap)", spread(T.sample(world, collage, samples, seed=1), factors))]


def host_models():
    from comfy_host import find_host, host_version, import_host
    host = find_host()
    import_host(host)
    import nodes
    import lpips_weights
    import tiny_models as tm
    from controlsync.nodes import bridge
    from controlsync.nodes.anchor_sync import AnchorSync
    from controlsync.nodes.controlsync_sampler import ControlSyncSampler
    from controlsync.nodes.factor_graph_collage import FactorGraphCollage
    from controlsync.nodes.window_planner import WindowPlanner
    from controlsync.sampling import metrics
    lpips_weights.use_cached_backbones()
    loss = bridge.load_lpips("alex", "cpu")
    distance = lambda a, b: loss(a, b, normalize=False).flatten()  # noqa: E731
    H, W, win, steps, seed = 64, 384, 64, 8, 3
    with torch.inference_mode():
        model, cn, vae = tm.tiny_model(0), tm.tiny_controlnet(1), tm.tiny_vae()
        image = tm.condition_image(H, W)
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(tm.text_cond(10), tm.text_cond(11), cn, image, 1.0, 0.0, 1.0)
        windows = WindowPlanner.execute(W, H, win, win, win // 2, "first", 0, "uniform", image=image).args[0]
        collage = FactorGraphCollage.execute("chain", W, H, win, win, win // 2, "horizontal", 0, image=image).args[0]
        sync = AnchorSync.execute(vae, 200.0, 1.0, 50, "alex", "exact").args[0]

        def sample(plan, sync=None, latent_w=W // 8, p=pos, n=neg):
            latent = {"samples": torch.zeros(1, 4, H // 8, latent_w)}
            return ControlSyncSampler.execute(model, seed, steps, 7.5, "euler", "normal", p, n, latent, plan, 1.0, 1,
                                              sync).args[0]["samples"]

        # independent windows: each non-overlapping window its own KSampler run with its own crop of the condition
        parts = []
        for k, x in enumerate(range(0, W, win)):
            crop_pos, crop_neg = nodes.ControlNetApplyAdvanced().apply_controlnet(
                tm.text_cond(10), tm.text_cond(11), cn, image[:, :, x:x + win], 1.0, 0.0, 1.0)
            parts.append(nodes.common_ksampler(model, seed + k, steps, 7.5, "euler", "normal", crop_pos, crop_neg,
                                               {"samples": torch.zeros(1, 4, H // 8, win // 8)})[0]["samples"])
        latents = {"independent windows": torch.cat(parts, dim=-1), "joint averaging": sample(windows),
                   "AnchorSync (w 200, every step)": sample(windows, sync), "DiffCollage (chain, half overlap)": sample(collage)}
        rows, drifts = [], {}
        cond = image[0].movedim(-1, 0) * 2 - 1
        for name, latent in latents.items():
            img = vae.decode(latent)[0].movedim(-1, 0).float() * 2 - 1
            crops = [img[:, :, x:x + win] for x in range(0, W - win + 1, win // 2)]
            drift = metrics.drift_profile(crops, 0, distance)
            drifts[name] = drift
            rows.append((name, metrics.intra_lpips(img, distance, win), sum(drift) / (len(drift) - 1),
                         metrics.seam_score(img, list(range(win // 2, W, win // 2))),
                         metrics.edge_f1(metrics.sobel_edges(img), metrics.sobel_edges(cond))))
    return f"ComfyUI {host_version(host)}", rows, drifts


def drift_picture(drifts: dict) -> None:
    """Grouped bars: per window, one bar per method (colours in the README's order)."""
    import numpy as np
    from PIL import Image
    colors = [torch.tensor(c) for c in ([0.6, 0.6, 0.6], [0.2, 0.6, 0.95], [1.0, 0.15, 0.6], [0.3, 0.8, 0.35])]
    names = list(drifts)
    n = len(next(iter(drifts.values())))
    top = max(max(v) for v in drifts.values()) * 1.1
    height, bar, gap = 200, 8, 10
    width = gap + n * (len(names) * bar + gap)
    chart = torch.ones(height, width, 3)
    for i in range(n):
        for k, name in enumerate(names):
            x0 = gap + i * (len(names) * bar + gap) + k * bar
            h = max(2, round(height * drifts[name][i] / top))
            chart[height - h:, x0:x0 + bar - 1] = colors[k]
    Image.fromarray((chart.numpy() * 255).astype(np.uint8)).save(CHART, optimize=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=1000)
    args = p.parse_args()
    bed = test_bed(args.samples)
    version, rows, drifts = host_models()
    drift_picture(drifts)
    lines = [f"Generated by `tests/make_results.py` on {platform.machine()}, {os.cpu_count()} CPU cores, torch "
             f"{torch.__version__}, {version}; fixed seeds (test bed: 7 and 1; models: 3).", "",
             f"Analytic test bed (global style shared by all 48 cells, detail std 0.3; 5 windows of 16, stride 8; "
             f"{args.samples} samples): spread of the windows' style (0 = one style everywhere).", "",
             "| method | style spread |", "|---|---|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in bed]
    lines += ["", "Tiny random-weight models in ComfyUI (SD1.5-architecture UNet + ControlNet + VAE, 384x64 canvas, "
              "64 px windows, euler 8 steps, cfg 7.5, LPIPS-alex): the mechanism, not image quality.", "",
              "| method | intra-LPIPS | mean drift to window 0 | seam score at window edges | edge F1 vs condition |",
              "|---|---|---|---|---|"]
    lines += [f"| {n} | {a:.4f} | {b:.4f} | {c:.2f} | {d:.3f} |" for n, a, b, c, d in rows]
    lines += ["", "![drift per window: independent (grey), averaging (blue), AnchorSync (pink), DiffCollage (green)]"
              "(nodes/web/docs/results_drift.png)"]
    text = README.read_text()
    section = "<!-- RESULTS:BEGIN -->\n" + "\n".join(lines) + "\n<!-- RESULTS:END -->"
    text = re.sub(r"<!-- RESULTS:BEGIN -->.*<!-- RESULTS:END -->", lambda m: section, text, flags=re.S)
    README.write_text(text)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
