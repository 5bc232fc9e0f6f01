"""Model files for the SDXL, Flux and Z-Image workflows' end-to-end runs, built once and cached in
tests/.cache/e2e_families/.

Random seeded weights (fp16) under the standard file names the shipped workflows use, in layouts ComfyUI's
own loaders accept (written with ComfyUI's own save helpers):

* `sd_xl_base_1.0.safetensors` (CheckpointLoaderSimple): model detection matches SDXL only with its real
  model_channels (320), context width (2048), size-conditioning width (2816) and transformer depths
  [0, 0, 2, 2, 10, 10]; the UNet keeps those and is cut elsewhere (channel_mult [1, 1, 1], no transformers on
  the way up). The text encoders are full size: SDXL's loader has one fixed config each for CLIP-L and
  CLIP-G (~1.6 GB of the ~1.9 GB); the VAE has the standard SD layout.
* `controlnet-canny-sdxl-1.0.safetensors` (ControlNetLoader): a ControlNet with that UNet's settings.
* `flux1-dev.safetensors` (UNETLoader): Flux detection fixes the width (3072, 24 heads, 4096-wide text);
  depth is read from the file: one double-stream block, no single-stream block (~0.8 GB).
* `flux-canny-controlnet-v3.safetensors` (ControlNetLoader): an XLabs Flux ControlNet, one double block.
* `ae.safetensors` (VAELoader): Flux's 16-channel VAE layout.
* `clip_l.safetensors`: CLIP-L, full size (its loader's fixed config).
* `z_image_turbo_bf16.safetensors` (UNETLoader): Z-Image is detected by its width (3840, 30 heads) and always has
  two noise- and two context-refiner blocks; the main depth is read from the file: one block (0.9 B parameters,
  ~1.8 GB in bf16). Its text width is read from the file too: 768, CLIP-L's (see below).

Not built: `t5xxl_fp16.safetensors`, `qwen_3_4b.safetensors`. Flux's text encoder loader (DualCLIPLoader, type flux) takes T5-XXL
with a fixed config (4.7 B parameters, 9.5 GB in fp16, 4.9 GB in fp8); no smaller T5 is accepted for Flux.
The end-to-end run swaps the workflow's DualCLIPLoader (clip_l + t5xxl, flux) for ComfyUI's CLIPLoader with
the same clip_l file as type sd3, which ComfyUI accepts and which gives Flux what it reads: 4096-wide token
embeddings (CLIP-L's, zero-padded) and CLIP-L's pooled vector first in the pooled output. Everything else in
the workflow runs as shipped. Z-Image's text encoder (CLIPLoader, type lumina2) is Qwen3-4B with a fixed config (36
layers, 2560 wide: 4 B parameters, 8 GB in bf16; every 2560-wide encoder ComfyUI knows is as large): the Z-Image
run swaps that one loader for CLIPLoader with the same clip_l file, type stable_diffusion (768-wide token
embeddings), which is why the stand-in Z-Image reads 768-wide text (`cap_feat_dim`, read from the file).

    python tests/e2e_family_assets.py     # build the cache
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
CACHE = TESTS / ".cache" / "e2e_families"
ASSET_VERSION = 3
SEED = 20251012

SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
SDXL_CONTROLNET = "controlnet-canny-sdxl-1.0.safetensors"
FLUX_UNET = "flux1-dev.safetensors"
FLUX_CONTROLNET = "flux-canny-controlnet-v3.safetensors"
FLUX_VAE = "ae.safetensors"
CLIP_L = "clip_l.safetensors"
T5XXL = "t5xxl_fp16.safetensors"  # named by the Flux workflow; not built (see above)
ZIMAGE_UNET = "z_image_turbo_bf16.safetensors"
QWEN3_4B = "qwen_3_4b.safetensors"  # named by the Z-Image workflow; not built (see above)

# every model file the SDXL and Flux workflows name -> its model folder (merged into tests/e2e_assets.py's
# stand-in mapping where one exists); T5XXL has no stand-in: the Flux run swaps its loader
STAND_INS = {
    SDXL_CHECKPOINT: "checkpoints",
    SDXL_CONTROLNET: "controlnet",
    FLUX_UNET: "diffusion_models",
    FLUX_CONTROLNET: "controlnet",
    FLUX_VAE: "vae",
    CLIP_L: "text_encoders",
    ZIMAGE_UNET: "diffusion_models",
}

SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_output": [0] * 9,
    "channel_mult": [1, 1, 1], "transformer_depth_middle": -1, "use_linear_in_transformer": True, "context_dim": 2048,
    "num_head_channels": 64, "num_heads": -1, "use_temporal_resblock": False, "use_temporal_attention": False,
}
FLUX_CONFIG = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
    "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1, "depth_single_blocks": 0,
    "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
    "txt_ids_dims": [],  # ComfyUI 0.33's FluxParams field (detection sets [] for Flux)
}
# Z-Image as model_detection sets it for a 3840-wide file; one main block; 768-wide text (CLIP-L's)
ZIMAGE_CONFIG = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840, "cap_feat_dim": 768, "n_layers": 1,
    "qk_norm": True, "n_heads": 30, "n_kv_heads": 30, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
    "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
    "pad_tokens_multiple": 32,
}
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


class Assets:
    def __init__(self, root: Path):
        self.root = root
        self.manifest = root / "manifest.json"

    def path(self, name: str) -> Path:
        return self.root / STAND_INS[name] / name

    def files(self):
        return [self.path(n) for n in STAND_INS]

    @property
    def folders(self) -> dict:
        """Model folder kind -> directory, for extra_model_paths.yaml."""
        return {kind: self.root / kind for kind in sorted(set(STAND_INS.values()))}

    def valid(self) -> bool:
        from e2e_assets import manifest_matches
        return manifest_matches(self.manifest, ASSET_VERSION, self.files())


def ensure_family_assets(host: Path, python: str | None = None, root: Path = CACHE) -> Assets:
    from e2e_assets import build_once
    return build_once(Assets(root), str(Path(__file__).resolve()), host, python, root.parent / "e2e_families.lock", 1800)


# ---------------------------------------------------------------------------------------------------
# Everything below runs in the builder subprocess (host python, host on sys.path).

def build(root: Path, host: Path) -> None:
    sys.path.insert(0, str(host))
    sys.path.insert(0, str(TESTS))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import torch
    import comfy.cldm.cldm
    import comfy.ldm.flux.controlnet
    import comfy.ldm.models.autoencoder
    import comfy.ops
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.utils
    from e2e_assets import _fp16, _init_weights, write_manifest

    assets = Assets(root)
    ops = comfy.ops.disable_weight_init

    def save(sd, name):
        path = assets.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        comfy.utils.save_torch_file(_fp16(sd), str(path))

    with torch.inference_mode(False):
        torch.manual_seed(SEED)
        # SDXL checkpoint: UNet + CLIP-L + CLIP-G + VAE, in the layout ComfyUI saves checkpoints in
        config = comfy.supported_models.SDXL(dict(SDXL_UNET))
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model({}, device="cpu")
        _init_weights(model.diffusion_model, SEED)
        clip = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float32)
        _init_weights(clip, SEED + 1)
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE), embed_dim=4)
        _init_weights(vae, SEED + 2)
        # 0.33 takes the UNet's state dict as the first argument (0.3.64 read it from the model itself)
        unet = (model.diffusion_model.state_dict(),) if "unet_state_dict" in inspect.signature(
            model.state_dict_for_saving).parameters else ()
        save(model.state_dict_for_saving(*unet, clip_state_dict=clip.state_dict(), vae_state_dict=vae.state_dict()),
             SDXL_CHECKPOINT)
        del model, clip, vae

        unet = {k: v for k, v in SDXL_UNET.items()
                if k not in ("out_channels", "transformer_depth_output", "use_temporal_resblock", "use_temporal_attention")}
        control = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=ops, dtype=torch.float32, device="cpu", **unet)
        _init_weights(control, SEED + 3)
        save({"control_model." + k: v for k, v in control.state_dict().items()}, SDXL_CONTROLNET)
        del control

        # Flux: diffusion model (UNETLoader's layout), XLabs ControlNet, VAE, CLIP-L
        flux = comfy.supported_models.Flux(dict(FLUX_CONFIG))
        flux.set_inference_dtype(torch.float32, None)
        model = flux.get_model({}, device="cpu")
        _init_weights(model.diffusion_model, SEED + 4)
        save(published_flux_layout(model.diffusion_model.state_dict()), FLUX_UNET)
        del model

        config = {k: v for k, v in FLUX_CONFIG.items() if k != "image_model"}
        control = comfy.ldm.flux.controlnet.ControlNetFlux(mistoline=False, operations=ops, device="cpu",
                                                           dtype=torch.float32, **config)
        _init_weights(control, SEED + 5)
        save(published_flux_layout(control.state_dict()), FLUX_CONTROLNET)
        del control

        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE, z_channels=16), embed_dim=16)
        _init_weights(vae, SEED + 6)
        save(vae.state_dict(), FLUX_VAE)
        del vae

        clip_l = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
        _init_weights(clip_l, SEED + 7)
        save(clip_l.transformer.state_dict(), CLIP_L)
        del clip_l

        # Z-Image: diffusion model (UNETLoader's layout), bf16 as published
        zimage = comfy.supported_models.ZImage(dict(ZIMAGE_CONFIG))
        zimage.set_inference_dtype(torch.float32, None)
        model = zimage.get_model({}, device="cpu")
        _init_weights(model.diffusion_model, SEED + 8)
        path = assets.path(ZIMAGE_UNET)
        path.parent.mkdir(parents=True, exist_ok=True)
        comfy.utils.save_torch_file({k: v.to(torch.bfloat16) for k, v in model.diffusion_model.state_dict().items()},
                                    str(path))
        del model

    write_manifest(assets.manifest, ASSET_VERSION, host, assets.files())


def published_flux_layout(sd: dict) -> dict:
    """Flux's attention norms under the names the published files use (`*_norm.scale`; ComfyUI 0.33's modules name
    them `weight` and its loaders rename them back); the XLabs ControlNet loader is detected by that name."""
    return {(k[:-len("weight")] + "scale" if k.endswith(("query_norm.weight", "key_norm.weight")) else k): v
            for k, v in sd.items()}


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", metavar="DIR", help="(internal) build the cache into DIR in this process")
    ap.add_argument("--host", help="ComfyUI host directory")
    args = ap.parse_args(argv)
    if args.build:
        build(Path(args.build), Path(args.host))
        return 0
    sys.path.insert(0, str(TESTS))
    from comfy_host import find_host
    host = Path(args.host) if args.host else find_host()
    if host is None:
        print("no ComfyUI host found (set COMFYUI_PATH)", file=sys.stderr)
        return 2
    for f in ensure_family_assets(host).files():
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
