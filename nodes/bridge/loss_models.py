"""The perceptual loss AnchorSync looks through: the decoder (the VAE, or ComfyUI's TAESD) and LPIPS, loaded from
the files users put in ComfyUI's folders (never downloaded)."""
from __future__ import annotations

import os

import torch

import comfy.model_management
import folder_paths

from ...sampling.perceptual import build_lpips, find_backbone, hub_checkpoints
from . import memory
from .autograd import autograd_copy


_lpips_cache: dict = {}


# where users put the LPIPS backbone files (also settable in extra_model_paths.yaml as `lpips:`)
folder_paths.add_model_folder_path("lpips", os.path.join(folder_paths.models_dir, "lpips"))


def lpips_backbone_path(net: str) -> str:
    """The torchvision ImageNet backbone file LPIPS needs, from ComfyUI's models/lpips or torch's hub cache."""
    return find_backbone(net, list(folder_paths.get_folder_paths("lpips")) + [hub_checkpoints()])


def load_lpips(net: str, device, dtype=torch.float32):
    key = (net, str(device), dtype)
    if key not in _lpips_cache:
        with torch.inference_mode(False):  # usable for gradients whichever mode it is first asked in
            _lpips_cache[key] = build_lpips(net, lpips_backbone_path(net)).to(device, dtype)
    return _lpips_cache[key]


_taesd_cache: dict = {}


def load_taesd(latent_format, device):
    """ComfyUI's TAESD decoder for this model (the file its TAESD previews use), built for autograd."""
    import comfy.taesd.taesd
    name = latent_format.taesd_decoder_name
    found = next((f for f in folder_paths.get_filename_list("vae_approx") if name and f.startswith(name)), None)
    if found is None:
        raise ValueError(f"sync: loss_decoder 'taesd' needs TAESD's decoder for this model in ComfyUI/models/vae_approx/ "
                         f"({name or 'this model has no TAESD'}.safetensors, the file ComfyUI's TAESD previews use); "
                         f"or set loss_decoder to 'vae'")
    path = folder_paths.get_full_path("vae_approx", found)
    key = (path, str(device))
    if key not in _taesd_cache:
        with torch.inference_mode(False):
            taesd = comfy.taesd.taesd.TAESD(None, path, latent_channels=latent_format.latent_channels)
            _taesd_cache[key] = taesd.to(device).eval().requires_grad_(False)
    return _taesd_cache[key]


def load_vae(vae) -> None:
    """The VAE loaded beside the models the sampler is using (none of them unloaded for it)."""
    comfy.model_management.load_models_gpu(comfy.model_management.loaded_models(only_currently_used=True) + [vae.patcher])


def decode_latent(vae, latent_format, x0, dtype):
    """The VAE's decoder on a model-space latent, differentiable (latent_format: an autograd_copy); video VAEs give
    their one frame."""
    image = vae.first_stage_model.decode(latent_format.process_out(x0).to(vae.device, vae.vae_dtype))
    return (image[:, :, 0] if image.ndim == 5 else image).to(dtype)


def loss_path(sync, model, x_in):
    """(decode, modules autograd runs through, loss, bytes per decoded pixel for the batch estimate) of
    AnchorSync's perceptual loss, its networks loaded."""
    if sync.loss_decoder == "taesd":
        taesd = load_taesd(model.latent_format, x_in.device)
        device, loss_dtype, modules = x_in.device, torch.float32, []
    else:
        vae = sync.vae
        load_vae(vae)
        # LPIPS in float32 (float64 when the VAE runs in float64: exact gradient checks)
        device, loss_dtype, modules = vae.device, (torch.float64 if vae.vae_dtype == torch.float64 else torch.float32), [vae.first_stage_model]
    loss_net = load_lpips(sync.loss_net, device, loss_dtype)
    with torch.inference_mode(False):
        latent_format = autograd_copy(model.latent_format)

    def decode(x0):
        if sync.loss_downscale > 1:
            k = sync.loss_downscale  # over height and width (one-frame video latents: (B, C, 1, H, W))
            x0 = torch.nn.functional.avg_pool2d(x0, k) if x0.ndim == 4 else torch.nn.functional.avg_pool3d(x0, (1, k, k))
        if sync.loss_decoder == "taesd":  # TAESD reads the model-space latent, as in ComfyUI's previews
            return taesd.decode(x0.float()).to(loss_dtype)
        return decode_latent(sync.vae, latent_format, x0, loss_dtype)

    def loss(image, anchor_image):
        return loss_net(image.to(anchor_image.device), anchor_image, normalize=False)

    # the batch estimate's per-pixel cost of the decoder and LPIPS (memory.py), per pixel the decoder sees
    bytes_per_pixel = memory.LOSS_BYTES_PER_PIXEL / sync.loss_downscale ** 2
    return decode, modules, loss, bytes_per_pixel
