"""Benchmark (not a test): window-local vs canvas-global RoPE positions for Flux windows.

    ~/comfy/venv/bin/python tests/benchmark_positions.py [--seeds 4] [--steps 8]

The pack gives every window the positions of an image of its own (window-local), what a model call on the
window-sized latent does. ComfyUI 0.3.64 offers one public way to move Flux's image positions: a
`post_input` patch in transformer_options, which may rewrite `img_ids`. This script adds, per window, the
window's offset in the canvas (in patches) to the ids of the main model (the Flux ControlNets compute their
own ids and cannot be reached that way) and compares coherence on the tiny Flux of tests/tiny_families.py:
the mean LPIPS of every window's decoded crop to the first window's, over several seeds, and how far the
global ids move the sampled latent at all.

Tiny random weights carry no learned notion of position: whatever difference this prints says nothing about
a trained Flux. It measures only that the mechanism changes the result.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args(argv)
    from comfy_host import find_host, import_host
    pack = import_host(find_host())
    import torch
    import comfy.patcher_extension
    import comfy_extras.nodes_flux as nflux
    import lpips_weights
    import tiny_families as tf
    import tiny_models as tm
    from controlsync.nodes import bridge
    from controlsync.nodes.window_planner import WindowPlanner

    lpips_weights.use_cached_backbones()
    loss = bridge.load_lpips("alex", "cpu")
    height, width, window, stride = 64, 320, 64, 32
    plan = WindowPlanner.execute(width, height, window, height, stride, "first", 0, "uniform").args[0]
    starts = list(range(0, (width - window) // 8 + 1, stride // 8))  # latent cells

    def global_positions(executor, model, conds, x, timestep, model_options, *a, **kw):
        """Below the pack's wrapper, one window per call in plan order: shift its image ids by its offset."""
        calls = global_positions.calls
        offset = starts[calls % len(starts)] // 2  # patches
        global_positions.calls += 1
        options = dict(model_options)
        transformer_options = dict(options.get("transformer_options", {}))
        patches = dict(transformer_options.get("patches", {}))

        def shift(d):
            ids = d["img_ids"].clone()
            ids[..., 2] += offset
            return dict(d, img_ids=ids)
        patches["post_input"] = list(patches.get("post_input", [])) + [shift]
        transformer_options["patches"] = patches
        options["transformer_options"] = transformer_options
        return executor(model, conds, x, timestep, options, *a, **kw)

    with torch.inference_mode():
        model, vae = tf.model("flux"), tf.vae("flux")
        pos = nflux.FluxGuidance.execute(tf.text_cond("flux", 10, guidance=None), 3.5).args[0]
        latent = {"samples": torch.zeros(1, 16, height // 8, width // 8)}
        results, latents = {}, {}
        for name in ("window-local", "canvas-global"):
            scores = []
            for seed in range(args.seeds):
                windowed = bridge.windowed_model(model, plan, 1)
                if name == "canvas-global":
                    global_positions.calls = 0
                    windowed.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "bench.positions",
                                                  global_positions)
                import nodes
                out = nodes.common_ksampler(windowed, seed, args.steps, 1.0, "euler", "simple", pos, pos, latent)[0]
                latents.setdefault(seed, []).append(out["samples"])
                images = vae.decode(out["samples"]).movedim(-1, 1) * 2 - 1
                crops = [images[..., s * 8:s * 8 + window] for s in starts]
                scores.append(sum(float(loss(c, crops[0])) for c in crops[1:]) / (len(crops) - 1))
            results[name] = scores
            print(f"{name:>14}: mean LPIPS of each window to the first, per seed {[round(v, 5) for v in scores]}, "
                  f"mean {sum(scores) / len(scores):.5f}")
        moved = max(float((a - b).abs().max()) for a, b in latents.values())
        print(f"largest change of the sampled latent by canvas-global positions: {moved:.3g} "
              f"(latent magnitude {max(float(a.abs().max()) for a, _ in latents.values()):.3g})")
    del tm, pack
    return 0


if __name__ == "__main__":
    sys.exit(main())
