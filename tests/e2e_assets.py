"""Files for end-to-end tests against a real ComfyUI server, built once and cached in tests/.cache/e2e/.

* An SD1.5 checkpoint that CheckpointLoaderSimple accepts: model detection matches SD1.5 (UNet
  model_channels 320, context_dim 768) but the UNet keeps one level (channel_mult [1], one res block);
  the VAE has the standard SD layout and the CLIP-L text encoder is full size. Seeded random weights,
  fp16, written with ComfyUI's own helpers (`state_dict_for_saving`, `comfy.utils.save_torch_file`).
* A ControlNet with the same UNet settings, saved under `control_model.`, that ControlNetLoader accepts.
* Canny-style edge maps of five scikit-image sample photos side by side (public domain / CC0): the
  condition image the shipped workflow uses (workflows/controlsync_canny_512x3072.png) and small ones.

The files carry the standard names the shipped workflow uses, so it runs unchanged against them.
Building needs a ComfyUI host and scikit-image; it runs in a subprocess of the host's python (the
venv the tests run in) with the host on sys.path and CPU arguments, so nothing leaks into the caller.

    python tests/e2e_assets.py                   # build the cache (host: $COMFYUI_PATH, ~/comfy/ComfyUI, ...)
    python tests/e2e_assets.py --condition OUT.png [--size 512x3072]   # just an edge map
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PACK_DIR = TESTS.parent
CACHE = TESTS / ".cache" / "e2e"

# Bump when anything below changes what gets written: the cache is rebuilt.
ASSET_VERSION = 2
SEED = 20240611

CHECKPOINT_NAME = "v1-5-pruned-emaonly-fp16.safetensors"
CONTROLNET_NAME = "control_v11p_sd15_canny_fp16.safetensors"
CONDITION_NAME = "controlsync_canny_512x3072.png"
SHIPPED_CONDITION = PACK_DIR / "workflows" / CONDITION_NAME
SMALL_CONDITION_NAME = "controlsync_canny_128x384.png"

# Every model file a shipped workflow names (its loaders' and its top-level `properties.models` / `models`
# entries) -> the model folder it belongs to; the end-to-end servers serve a random-weight stand-in under that
# name from that folder (the LPIPS backbones are the real convolutions: tests/lpips_weights.py). A new workflow
# that needs another file adds it here (and its builder below); tests/test_workflows.py and test_browser.py
# read every workflows/*.json against this mapping.
STAND_INS = {
    CHECKPOINT_NAME: "checkpoints",
    CONTROLNET_NAME: "controlnet",
    "vgg16-397923af.pth": "lpips",
    "alexnet-owt-7be5be79.pth": "lpips",
}

# Small but detectable as SD1.5 (see DESIGN-NOTES 3).
UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [1], "transformer_depth": [1], "transformer_depth_output": [1, 1],
    "channel_mult": [1], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
# The standard SD VAE layout (the only one a checkpoint's VAE is read as).
VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}

# scikit-image sample photos, all public domain or CC0 (see skimage.data's docs).
PANELS = ["astronaut", "camera", "coffee", "chelsea", "rocket"]


class Assets:
    def __init__(self, root: Path):
        self.root = root
        self.checkpoints = root / "checkpoints"
        self.controlnet = root / "controlnet"
        self.checkpoint = self.checkpoints / CHECKPOINT_NAME
        self.controlnet_file = self.controlnet / CONTROLNET_NAME
        self.condition = root / "input" / CONDITION_NAME
        self.small_condition = root / "input" / SMALL_CONDITION_NAME
        self.manifest = root / "manifest.json"

    def files(self):
        return [self.checkpoint, self.controlnet_file, self.condition, self.small_condition]

    def valid(self) -> bool:
        return manifest_matches(self.manifest, ASSET_VERSION, self.files())


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            import fcntl
            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # Windows: no concurrent builds expected there
            pass
        yield


def manifest_matches(manifest: Path, version: int, files) -> bool:
    """Whether a cache's manifest is of `version` and lists every one of `files` at its current size."""
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return recorded.get("version") == version and all(
        f.is_file() and f.stat().st_size == recorded["sizes"].get(f.name) for f in files)


def write_manifest(manifest: Path, version: int, host: Path, files) -> None:
    manifest.write_text(json.dumps({"version": version, "host": str(host),
                                    "sizes": {f.name: f.stat().st_size for f in files}}, indent=1))


def build_once(assets, script: str, host: Path, python: str | None, lock: Path, timeout: int):
    """`assets` (with .root and .valid()), built first if missing or stale by `script --build ROOT --host HOST` in a
    subprocess of `python`, under a file lock so that parallel test workers build it once."""
    if assets.valid():
        return assets
    with _locked(lock):
        if assets.valid():
            return assets
        t0 = time.time()
        cmd = [python or sys.executable, script, "--build", str(assets.root), "--host", str(host)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not assets.valid():
            raise RuntimeError(f"building {assets.root} failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                               f"{proc.stderr[-4000:]}")
        print(f"[{Path(script).stem}] built {assets.root} in {time.time() - t0:.1f}s", file=sys.stderr)
    return assets


def ensure_assets(host: Path, python: str | None = None, root: Path = CACHE) -> Assets:
    """The cached files, built first if missing or stale (in a subprocess of `python` with `host` importable)."""
    return build_once(Assets(root), str(Path(__file__).resolve()), host, python, root.parent / "e2e.lock", 900)


# ---------------------------------------------------------------------------------------------------
# Everything below runs in the builder subprocess (host python, host on sys.path).

def edge_map(height: int, width: int):
    """Canny edges (white on black, uint8 HxW) of the sample photos side by side, squeezed to width."""
    import numpy as np
    import skimage.data
    from skimage.color import rgb2gray
    from skimage.feature import canny
    from skimage.transform import resize

    photos = []
    for name in PANELS:
        img = getattr(skimage.data, name)()
        photos.append(rgb2gray(img) if img.ndim == 3 else img.astype(np.float64) / 255.0)
    aspects = [p.shape[1] / p.shape[0] for p in photos]
    total = sum(aspects)
    edges = [0] + [round(width * sum(aspects[:i + 1]) / total) for i in range(len(photos))]
    sigma = max(1.0, 2.0 * height / 512)
    out = np.zeros((height, width), dtype=np.uint8)
    for photo, x0, x1 in zip(photos, edges[:-1], edges[1:]):
        panel = resize(photo, (height, x1 - x0), anti_aliasing=True)
        out[:, x0:x1] = canny(panel, sigma=sigma) * 255
    return out


def write_condition(path: Path, height: int, width: int) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(edge_map(height, width), mode="L").convert("RGB").save(path, optimize=True)


def _init_weights(module, seed: int) -> None:
    """Seeded, scale-preserving random weights: norms at identity, linear/conv ~ N(0, 1/fan_in), zero biases."""
    import torch
    g = torch.Generator().manual_seed(seed)
    done = set()
    with torch.no_grad():
        for _, m in sorted(module.named_modules(), key=lambda kv: kv[0]):
            for pname, p in sorted(m.named_parameters(recurse=False), key=lambda kv: kv[0]):
                if id(p) in done:
                    continue
                done.add(id(p))
                if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    p.fill_(1.0 if pname == "weight" else 0.0)
                elif isinstance(m, torch.nn.Embedding):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
                elif pname == "bias" or p.ndim < 2:
                    p.zero_()
                else:
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def _fp16(sd):
    import torch
    return {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def build(root: Path, host: Path) -> None:
    sys.path.insert(0, str(host))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import torch
    import comfy.cldm.cldm
    import comfy.ldm.models.autoencoder
    import comfy.ops
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.utils

    torch.manual_seed(SEED)
    assets = Assets(root)
    ops = comfy.ops.disable_weight_init
    with torch.inference_mode(False):
        # UNet via ComfyUI's SD1.5 config -> BaseModel, so state_dict_for_saving applies its own key layout.
        config = comfy.supported_models.SD15(dict(UNET_CONFIG))
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model({}, device="cpu")
        _init_weights(model.diffusion_model, SEED)

        clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
        _init_weights(clip, SEED + 1)
        clip_sd = clip.state_dict()

        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(VAE_DDCONFIG), embed_dim=4)
        _init_weights(vae, SEED + 2)
        vae_sd = vae.state_dict()

        # 0.33 takes the UNet's state dict as the first argument (0.3.64 read it from the model itself)
        saving = inspect.signature(model.state_dict_for_saving).parameters
        unet = (model.diffusion_model.state_dict(),) if "unet_state_dict" in saving else ()
        sd = _fp16(model.state_dict_for_saving(*unet, clip_state_dict=clip_sd, vae_state_dict=vae_sd))
        assets.checkpoints.mkdir(parents=True, exist_ok=True)
        comfy.utils.save_torch_file(sd, str(assets.checkpoint))
        del model, clip, vae, sd, clip_sd, vae_sd

        cn_config = {k: v for k, v in UNET_CONFIG.items()
                     if k not in ("out_channels", "transformer_depth_output", "use_temporal_resblock", "use_temporal_attention")}
        control = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=ops, dtype=torch.float32, device="cpu", **cn_config)
        _init_weights(control, SEED + 3)
        cn_sd = _fp16({"control_model." + k: v for k, v in control.state_dict().items()})
        assets.controlnet.mkdir(parents=True, exist_ok=True)
        comfy.utils.save_torch_file(cn_sd, str(assets.controlnet_file))

    write_condition(assets.condition, 512, 3072)
    write_condition(assets.small_condition, 128, 384)
    write_manifest(assets.manifest, ASSET_VERSION, host, assets.files())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", metavar="DIR", help="(internal) build the cache into DIR in this process")
    ap.add_argument("--host", help="ComfyUI host directory")
    ap.add_argument("--condition", metavar="PNG", help="write only a condition edge map to PNG")
    ap.add_argument("--size", default="512x3072", help="HEIGHTxWIDTH of --condition (default 512x3072)")
    args = ap.parse_args(argv)
    if args.condition:
        h, w = (int(v) for v in args.size.lower().split("x"))
        write_condition(Path(args.condition), h, w)
        print(args.condition)
        return 0
    if args.build:
        build(Path(args.build), Path(args.host))
        return 0
    sys.path.insert(0, str(TESTS))
    from comfy_host import find_host
    host = Path(args.host) if args.host else find_host()
    if host is None:
        print("no ComfyUI host found (set COMFYUI_PATH)", file=sys.stderr)
        return 2
    assets = ensure_assets(host)
    for f in assets.files():
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
