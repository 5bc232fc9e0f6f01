"""GPU check (not a test: pytest does not collect it; the CPU suite cannot run it): ComfyUI 0.33's memory model
under the pack's gradient passes, and the MultiGPU dispatch when the machine has several GPUs.

    ~/comfy/venv/bin/python tests/gpu_check.py                             # the prepared run (~10 min, one H200)
    ~/comfy/venv/bin/python tests/gpu_check.py --smoke                     # the same code paths on the CPU, tiny

Every configuration runs in a fresh process, set up as ComfyUI's main.py sets up its memory model: "dynamic" runs
comfy-aimdo (comfy_aimdo.control.init before CUDA starts, init_devices, ModelPatcherDynamic as CoreModelPatcher,
comfy.memory_management.aimdo_enabled: 0.33's default on NVIDIA GPUs), "disabled" is --disable-dynamic-vram (the
ModelPatcher that loads the weights into VRAM). "streamed" is dynamic VRAM with a filler tensor taking all but
--keep-gib of free VRAM, so the weights cannot stay resident and each layer's weight reaches the GPU through
comfy-aimdo's cast buffers - the path that hands autograd views of reused memory (nodes/bridge/autograd.py
_is_cast_view). Models: SD1.5-sized UNet + ControlNet (860 M + 361 M) and a Flux-width DiT (hidden 3072, 24 heads,
2 double- and 4 single-stream blocks, ~1.2 B; Flux.1's 12 B does not change the per-layer path), random weights,
built through ComfyUI's supported_models configs, windows of 512 px.

Checks, per model, dtype (fp16, bf16) and memory mode:
  gradient  d<D(x), v>/dx of one window's model call inside `differentiable`, as AnchorSync's exact mode and
            Reconstruction differentiate: "dynamic" and "streamed" against "disabled" (relative L2 error, bound
            1e-2 - the same weights and kernels; fp16 noise is ~1e-3), and "streamed" once more with the cast-view
            copy switched off ("streamed-nocopy") to show what the copy prevents.
  peak      the peak VRAM of a synced run at window_batch_size 1 and 2 (exact AnchorSync; the gradient graph is the
            run's peak) next to the pack's estimate (nodes/bridge/memory.py window_bytes: per window, and the
            weight copies streamed_weight_bytes adds once per graph); the estimate must not be below the measured
            increase per window.
  bench     ControlSync Sampler on a 512x2048 canvas (7 windows, stride 256), ddim 20 steps, cfg 7.5, AnchorSync
            w 20 / decay 0.95 on its first 4 steps: time of off / exact / fast and the peak VRAM, after a warm-up.
  multigpu  (only with 2+ GPUs) MultiGPU CFG Split over every GPU against one GPU: the windows each GPU's model
            clone evaluated, the samples' relative difference (bound 1e-3) and the time ratio.
Results: a markdown table per check (the date, GPU, torch, ComfyUI and comfy-aimdo versions on top), and every
child's JSON under --out's folder, written as they finish (a time-out keeps what finished).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
FLUX_WIDTH = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
              "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 2, "depth_single_blocks": 4,
              "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
              "txt_ids_dims": []}
GRADIENT_BOUND, MULTIGPU_BOUND = 1e-2, 1e-3


# --- the child: one configuration in its own process ---------------------------------------------------------

def setup_host(args):
    """Import ComfyUI as main.py does for the memory mode (before CUDA starts), then the pack."""
    from comfy_host import find_host, load_pack
    host = find_host()
    sys.path.insert(0, str(host))
    import comfy.cli_args
    comfy.cli_args.args.cpu = args.device == "cpu"
    comfy.cli_args.args.disable_all_custom_nodes = True
    dynamic = args.vram in ("dynamic", "streamed", "streamed-nocopy")
    comfy.cli_args.args.disable_dynamic_vram = not dynamic
    if dynamic:
        import comfy_aimdo.control
        try:
            comfy_aimdo.control.init(simple_vram_headroom=None, nvml_pressure=True)
        except TypeError:
            comfy_aimdo.control.init()
    import comfy.model_management
    import comfy.memory_management
    import comfy.model_patcher
    if dynamic:
        import comfy_aimdo.control
        devices = comfy.model_management.get_all_torch_devices()
        try:
            ok = comfy_aimdo.control.init_devices((d.index, int(comfy.cli_args.args.vram_headroom * 1024 ** 3)) for d in devices)
        except TypeError:
            ok = comfy_aimdo.control.init_devices(d.index for d in devices)
        if not ok:
            raise SystemExit("comfy-aimdo did not initialise: dynamic VRAM unavailable on this machine")
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    import nodes  # noqa: F401
    import lpips_weights
    pack = load_pack()
    lpips_weights.use_cached_backbones()  # the real ImageNet backbones, converted offline (tests/lpips_weights.py)
    if args.vram == "streamed-nocopy":
        import controlsync.nodes.bridge.autograd as autograd
        autograd._is_cast_view = lambda t: False  # what the check shows the copy prevents
    return pack


def build(args):
    """(model patcher, ControlNet or None, VAE, positive, negative, latent channels) for args.model in args.dtype."""
    import torch
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.model_management
    import comfy.model_patcher
    import comfy.ops
    import comfy.supported_models
    import nodes
    import tiny_models as tm
    from benchmark_collage import SD15_FULL
    from benchmark_sync import make_vae
    dtype, dev = getattr(torch, DTYPES[args.dtype]), comfy.model_management.get_torch_device()
    full = not args.smoke
    with torch.inference_mode():
        vae = make_vae(tm, full, dtype, dev)
        if args.model == "sd15":
            if full:
                tm.SD15_UNET.update(SD15_FULL)
                tm.CONTEXT_DIM = SD15_FULL["context_dim"]
            config = comfy.supported_models.SD15(dict(tm.SD15_UNET))
            config.set_inference_dtype(dtype, None)
            model = config.get_model({}, device="cpu")
            tm._init_weights(model.diffusion_model, 0)
            patcher = comfy.model_patcher.CoreModelPatcher(model, load_device=dev, offload_device=torch.device("cpu"))
            cn_config = {k: v for k, v in tm.SD15_UNET.items() if k not in (
                "out_channels", "transformer_depth_output", "use_temporal_resblock", "use_temporal_attention")}
            net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=dtype,
                                             device="cpu", **cn_config)
            tm._init_weights(net, 1)
            cn = comfy.controlnet.ControlNet(net, load_device=dev)
            image = tm.condition_image(args.window, args.width)
            pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(tm.text_cond(1), tm.text_cond(2), cn, image,
                                                                        1.0, 0.0, 1.0)
            channels = 4
        else:
            import tiny_033
            import tiny_families as tf
            unet = dict(FLUX_WIDTH) if full else dict(tf.FLUX_UNET, txt_ids_dims=[])
            config = comfy.supported_models.Flux(unet)
            config.set_inference_dtype(dtype, None)
            model = config.get_model({}, device="cpu")
            tm._init_weights(model.diffusion_model, 0)
            patcher = comfy.model_patcher.CoreModelPatcher(model, load_device=dev, offload_device=torch.device("cpu"))
            g = torch.Generator().manual_seed(1)
            width, pooled = unet["context_in_dim"], unet["vec_in_dim"]
            text = lambda: [[torch.randn(1, 64, width, generator=g),  # noqa: E731
                             {"pooled_output": torch.randn(1, pooled, generator=g), "guidance": 3.5}]]
            pos, neg, cn = text(), text(), None
            vae = tiny_033.flux_vae() if args.smoke else make_flux_vae(tm, dtype, dev)
            channels = 16
    patcher.cached_patcher_init = (rebuild, (args.model, args.dtype, args.smoke))  # for MultiGPU's deep clones
    return patcher, cn, vae, pos, neg, channels


def make_flux_vae(tm, dtype, dev):
    import torch
    import comfy.ldm.models.autoencoder
    import comfy.sd
    from benchmark_sync import SD_VAE
    ddconfig = dict(SD_VAE, z_channels=16)
    net = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=ddconfig, embed_dim=16)
    tm._init_weights(net, 5)
    with torch.inference_mode():
        out = comfy.sd.VAE(sd=net.state_dict(), device=dev, dtype=dtype, config={"params": {"ddconfig": ddconfig, "embed_dim": 16}})
    out.latent_channels = 16
    return out


def rebuild(model, dtype, smoke, disable_dynamic=False):
    """The model again from its config and seed: the loader factory MultiGPU's deep clones call."""
    args = argparse.Namespace(model=model, dtype=dtype, smoke=smoke, window=512, width=2048)
    return build(args)[0]


def filler(args):
    """A tensor taking all but --keep-gib of free VRAM ("streamed"), or None. Taken before anything is loaded, so
    dynamic VRAM stages only what fits beside it and streams the rest through its cast buffers."""
    import torch
    if not args.vram.startswith("streamed") or args.device != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info()
    size = max(0, free - int(args.keep_gib * 2 ** 30))
    return torch.empty(size, dtype=torch.uint8, device="cuda")


def gradient_check(args, patcher, cn, pos, neg, channels, out_dir):
    """Save d<D(x), v>/dx of one window's cond+uncond call (through the ControlNet for SD1.5)."""
    import torch
    import comfy.model_management
    from controlsync.nodes.bridge import differentiable
    from controlsync.nodes.bridge.autograd import adds_in_place, gradient_options
    dev = comfy.model_management.get_torch_device()
    comfy.model_management.load_models_gpu([patcher] + ([cn.control_model_wrapped] if cn is not None else []))
    base = patcher.model
    side = args.window // 8
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, channels, side, side, generator=g).to(dev)
    v = torch.randn(2, channels, side, side, generator=g).to(dev)
    sigma = torch.full((2,), 5.0 if args.model == "sd15" else 0.7, device=dev)
    ctx = torch.cat([neg[0][0], pos[0][0]]).to(dev)
    kwargs = {"c_crossattn": ctx}
    if args.model != "sd15":
        kwargs["y"] = torch.cat([neg[0][1]["pooled_output"], pos[0][1]["pooled_output"]]).to(dev)
        kwargs["guidance"] = torch.full((2,), 3.5, device=dev)
    options = gradient_options({})
    control = None
    if cn is not None:
        control = cn.copy()
        control.set_cond_hint(pos[0][1]["control"].cond_hint_original[..., :args.window, :args.window], 1.0, (0.0, 1.0))
        control.pre_run(base, lambda percent: 0.0)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with differentiable([base.diffusion_model] + ([control.control_model] if control else []), copy_saved=adds_in_place(base)):
        xg = x.clone().requires_grad_(True)
        xx = torch.cat([xg, xg])
        if control is not None:
            kwargs["control"] = control.get_control(xx, sigma, {"c_crossattn": ctx}, 2, options["transformer_options"])
        out = base.apply_model(xx, sigma, transformer_options=options["transformer_options"], **kwargs)
        (grad,) = torch.autograd.grad((out.float() * v).sum(), xg)
    path = out_dir / f"grad_{args.model}_{args.dtype}_{args.vram}.pt"
    torch.save(grad.float().cpu(), path)
    return {"gradient_file": path.name, "loaded_mib": patcher.loaded_size() / 2 ** 20,
            "model_mib": patcher.model_size() / 2 ** 20, "dynamic": patcher.is_dynamic(),
            "grad_peak_mib": torch.cuda.max_memory_allocated() / 2 ** 20 if args.device == "cuda" else None}


def sampler_run(args, patcher, vae, pos, neg, channels, mode, batch, steps, sync_steps, width):
    import torch
    from controlsync.nodes.anchor_sync import AnchorSync
    from controlsync.nodes.controlsync_sampler import ControlSyncSampler
    from controlsync.nodes.window_planner import WindowPlanner
    plan = WindowPlanner.execute(width, args.window, args.window, args.window, args.window // 2, "first", 0,
                                 "uniform").args[0]
    latent = {"samples": torch.zeros(1, channels, args.window // 8, width // 8)}
    with torch.inference_mode():
        sync = None if mode == "off" else AnchorSync.execute(
            vae, 20.0, 0.95, sync_steps, "vgg", "skip model Jacobian" if mode == "fast" else "exact").args[0]
        return ControlSyncSampler.execute(patcher, 1, steps, 7.5 if args.model == "sd15" else 1.0, "ddim",
                                          "ddim_uniform", pos, neg, latent, plan, 1.0, batch, sync).args[0]["samples"]


def timed_peak(args, fn):
    import torch
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start_mem = torch.cuda.memory_allocated() if cuda else 0
    t0 = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - start_mem) / 2 ** 20 if cuda else None
    return out, seconds, peak


def peak_check(args, patcher, vae, pos, neg, channels):
    """Peak VRAM of a synced run (two steps, the first synced) at window batches 1 and 2, and the pack's estimate
    for one more window in a gradient graph, as the run computed it."""
    import controlsync.nodes.bridge.memory as memory
    estimates = []
    original = memory.window_bytes

    def spy(*a, **k):
        value = original(*a, **k)
        if k.get("gradient"):
            estimates.append(value)
        return value
    memory.window_bytes = spy
    try:
        width = args.width
        sampler_run(args, patcher, vae, pos, neg, channels, "exact", 0, 2, 25, width)  # automatic batch: the estimate
        rows = {}
        for batch in (1, 2):
            _, _, peak = timed_peak(args, lambda: sampler_run(args, patcher, vae, pos, neg, channels, "exact", batch, 2,
                                                              25, width))
            rows[batch] = peak
    finally:
        memory.window_bytes = original
    cast = memory.streamed_weight_bytes(patcher)
    return {"peak_mib_batch1": rows[1], "peak_mib_batch2": rows[2],
            "estimate_window_mib": estimates[0] / 2 ** 20 if estimates else None, "estimate_weights_mib": cast / 2 ** 20}


def bench_check(args, patcher, vae, pos, neg, channels):
    rows = {}
    sampler_run(args, patcher, vae, pos, neg, channels, "exact", 0, 2, 25, args.width)  # warm-up, one synced step
    for mode in ("off", "exact", "fast"):
        _, seconds, peak = timed_peak(args, lambda: sampler_run(args, patcher, vae, pos, neg, channels, mode, 0,
                                                                args.steps, 10, args.width))
        rows[mode] = {"seconds": seconds, "peak_mib": peak}
    return rows


def multigpu_check(args, patcher, vae, pos, neg, channels):
    import torch
    import comfy.model_management
    import comfy_extras.nodes_multigpu as multigpu
    count = torch.cuda.device_count() if args.device == "cuda" else 1
    if count < 2:
        return {"skipped": f"{count} GPU"}
    with torch.inference_mode():
        multi = multigpu.MultiGPUCFGSplitNode.execute(patcher, count).args[0]
    calls, handles = {}, []
    for p in [multi] + multi.get_additional_models_with_key("multigpu"):
        handles.append(p.model.diffusion_model.register_forward_hook(
            lambda m, a, o, d=str(p.load_device): calls.__setitem__(d, calls.get(d, 0) + 1)))
    try:
        spread, t_multi, _ = timed_peak(args, lambda: sampler_run(args, multi, vae, pos, neg, channels, "off", 1,
                                                                  args.steps, 10, args.width))
    finally:
        for h in handles:
            h.remove()
    one, t_one, _ = timed_peak(args, lambda: sampler_run(args, patcher, vae, pos, neg, channels, "off", 1, args.steps,
                                                         10, args.width))
    rel = float((spread.float() - one.float()).norm() / one.float().norm())
    comfy.model_management.unload_all_models()
    return {"gpus": count, "calls_per_device": calls, "relative_difference": rel, "time_ratio": t_multi / t_one}


def child(args):
    setup_host(args)
    out_dir = Path(args.out).resolve().parent
    patcher, cn, vae, pos, neg, channels = build(args)  # on the CPU: nothing is in VRAM yet
    hold = filler(args)  # noqa: F841  ("streamed": held while every check of this configuration runs)
    result = {"model": args.model, "dtype": args.dtype, "vram": args.vram}
    for check in args.checks:
        if check == "gradient":
            result["gradient"] = gradient_check(args, patcher, cn, pos, neg, channels, out_dir)
        elif check == "peak" and args.vram != "streamed-nocopy":
            result["peak"] = peak_check(args, patcher, vae, pos, neg, channels)
        elif check == "bench" and args.vram != "streamed-nocopy":
            result["bench"] = bench_check(args, patcher, vae, pos, neg, channels)
        elif check == "multigpu" and args.vram == "dynamic":
            result["multigpu"] = multigpu_check(args, patcher, vae, pos, neg, channels)
    print("RESULT " + json.dumps(result))


# --- the parent: every configuration, then the tables -------------------------------------------------------

def configurations(args):
    for model in args.models:
        for dtype in args.dtypes:
            for vram in args.vram_modes:
                yield model, dtype, vram


def machine(args):
    import platform
    import torch
    from comfy_host import find_host, host_version
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" and torch.cuda.is_available() else platform.processor()
    try:
        from importlib.metadata import version
        aimdo = version("comfy-aimdo")
    except Exception:
        aimdo = "?"
    return (f"{time.strftime('%Y-%m-%d')}, {gpu} x{torch.cuda.device_count() if args.device == 'cuda' else 0}, "
            f"torch {torch.__version__}, ComfyUI {host_version(find_host())}, comfy-aimdo {aimdo}")


def report(args, results):
    import torch
    lines = [f"GPU check ({machine(args)})", ""]
    refs = {}
    for r in results:
        if r["vram"] == "disabled" and "gradient" in r:
            refs[(r["model"], r["dtype"])] = torch.load(Path(args.out).resolve().parent / r["gradient"]["gradient_file"])
    lines += ["| model | dtype | memory | grad. rel. error vs disabled | bound | loaded / model MiB | gradient peak MiB |",
              "|---|---|---|---|---|---|---|"]
    failed = []
    for r in results:
        gr = r.get("gradient")
        if gr is None:
            continue
        ref = refs.get((r["model"], r["dtype"]))
        err = None
        if ref is not None and r["vram"] != "disabled":
            g = torch.load(Path(args.out).resolve().parent / gr["gradient_file"])
            err = float((g - ref).norm() / ref.norm())
            if r["vram"] != "streamed-nocopy" and not err <= GRADIENT_BOUND:
                failed.append(f"gradient {r['model']} {r['dtype']} {r['vram']}: {err:.2e}")
        lines.append(f"| {r['model']} | {r['dtype']} | {r['vram']} | {'-' if err is None else f'{err:.2e}'} | "
                     f"{'-' if r['vram'] in ('disabled', 'streamed-nocopy') else GRADIENT_BOUND} | "
                     f"{gr['loaded_mib']:.0f} / {gr['model_mib']:.0f} | {gr['grad_peak_mib'] or 0:.0f} |")
    lines += ["", "| model | dtype | memory | peak MiB batch 1 | batch 2 | per window measured | estimate per window | "
              "estimate weights |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        p = r.get("peak")
        if p is None or p["peak_mib_batch1"] is None:
            continue
        per = p["peak_mib_batch2"] - p["peak_mib_batch1"]
        est = p["estimate_window_mib"]
        if est is not None and est < per:
            failed.append(f"peak {r['model']} {r['dtype']} {r['vram']}: estimate {est:.0f} < measured {per:.0f} MiB")
        lines.append(f"| {r['model']} | {r['dtype']} | {r['vram']} | {p['peak_mib_batch1']:.0f} | {p['peak_mib_batch2']:.0f}"
                     f" | {per:.0f} | {'-' if est is None else f'{est:.0f}'} | {p['estimate_weights_mib']:.0f} |")
    lines += ["", "| model | dtype | memory | off s | exact x off | fast x off | peak MiB off / exact / fast |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        b = r.get("bench")
        if b is None:
            continue
        off = b["off"]["seconds"]
        peaks = " / ".join("-" if b[m]["peak_mib"] is None else f"{b[m]['peak_mib']:.0f}" for m in ("off", "exact", "fast"))
        lines.append(f"| {r['model']} | {r['dtype']} | {r['vram']} | {off:.2f} | {b['exact']['seconds'] / off:.2f} | "
                     f"{b['fast']['seconds'] / off:.2f} | {peaks} |")
    for r in results:
        m = r.get("multigpu")
        if m is None:
            continue
        lines += ["", f"MultiGPU ({r['model']}, {r['dtype']}): {json.dumps(m)}"]
        if "relative_difference" in m and not m["relative_difference"] <= MULTIGPU_BOUND:
            failed.append(f"multigpu relative difference {m['relative_difference']:.2e}")
    failed += [f"{r['model']} {r['dtype']} {r['vram']}: {r['error'].strip().splitlines()[-1]}" for r in results if "error" in r]
    lines += ["", "FAILED: " + "; ".join(failed) if failed else "all bounds hold"]
    text = "\n".join(lines)
    Path(args.out).write_text(text + "\n")
    return text, failed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(os.environ.get("OUT", tempfile.gettempdir())) / "gpu_check.md"),
                   help="the report; the children's JSON and gradients go beside it (default: $OUT, else the temp dir)")
    p.add_argument("--models", nargs="+", default=["sd15", "flux"], choices=["sd15", "flux"])
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=list(DTYPES))
    p.add_argument("--vram-modes", nargs="+", default=["disabled", "dynamic", "streamed", "streamed-nocopy"],
                   choices=["disabled", "dynamic", "streamed", "streamed-nocopy"])
    p.add_argument("--checks", nargs="+", default=["gradient", "peak", "bench", "multigpu"],
                   choices=["gradient", "peak", "bench", "multigpu"])
    p.add_argument("--keep-gib", type=float, default=3.0, help="free VRAM the 'streamed' filler leaves")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU: the code paths, not the numbers")
    p.add_argument("--timeout", type=int, default=400, help="seconds per configuration")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--vram", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.device, args.window, args.width, args.steps = "cpu", 64, 192, 3
        args.dtypes, args.vram_modes = ["fp32"], ["disabled"]
    if args.child:
        return child(args)
    Path(args.out).resolve().parent.mkdir(parents=True, exist_ok=True)
    results = []
    for model, dtype, vram in configurations(args):
        cmd = [sys.executable, __file__, "--child", "--model", model, "--dtype", dtype, "--vram", vram, "--out", args.out,
               "--keep-gib", str(args.keep_gib), "--steps", str(args.steps), "--window", str(args.window), "--width",
               str(args.width), "--device", args.device, "--checks", *args.checks] + (["--smoke"] if args.smoke else [])
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
            result = json.loads(line[-1][7:]) if line else {"model": model, "dtype": dtype, "vram": vram,
                                                            "error": done.stderr[-2000:]}
        except subprocess.TimeoutExpired:
            result = {"model": model, "dtype": dtype, "vram": vram, "error": f"timed out after {args.timeout} s"}
        result["child_seconds"] = time.perf_counter() - start
        print(json.dumps(result), flush=True)
        results.append(result)
        (Path(args.out).resolve().parent / "gpu_check.jsonl").open("a").write(json.dumps(result) + "\n")
    text, failed = report(args, results)
    print(text)
    return 1 if failed or any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
