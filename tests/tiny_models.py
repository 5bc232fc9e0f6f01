"""Tiny real ComfyUI models with seeded random weights, built from config the way ComfyUI builds
them (supported_models -> BaseModel -> ModelPatcher; cldm.ControlNet -> controlnet.ControlNet)."""
from __future__ import annotations

import torch

import comfy.cldm.cldm
import comfy.controlnet
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import comfy.supported_models
import comfy.t2i_adapter.adapter

CONTEXT_DIM = 64

SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
    "channel_mult": [1, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": CONTEXT_DIM, "num_heads": 2, "num_head_channels": -1,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}

SDXL_UNET = dict(SD15_UNET, model_channels=64, adm_in_channels=2816, num_classes="sequential", use_linear_in_transformer=True,
                 num_head_channels=16, num_heads=-1)


def _init_weights(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p.numel() // max(p.shape[0], 1) if p.ndim > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=g) / max(fan_in, 1) ** 0.5 * (0.5 if p.ndim > 1 else 0.1))


# four levels with two res blocks each: the input-block layout T2I adapters add their features to
SD15_DEEP_UNET = dict(SD15_UNET, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 1, 1, 1], transformer_depth=[0] * 8,
                      transformer_depth_output=[0] * 12, transformer_depth_middle=0)


def tiny_model(seed: int = 0, arch: str = "sd15") -> comfy.model_patcher.ModelPatcher:
    """A ~1M-parameter SD1.5 (or SDXL-architecture, with its size conditioning) model."""
    if arch == "sd15":
        config = comfy.supported_models.SD15(dict(SD15_UNET))
    elif arch == "sdxl":
        config = comfy.supported_models.SDXL(dict(SDXL_UNET))
    elif arch == "sd15_deep":
        config = comfy.supported_models.SD15(dict(SD15_DEEP_UNET))
    else:
        raise ValueError(arch)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, device="cpu")
    _init_weights(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def tiny_controlnet(seed: int = 1, arch: str = "sd15") -> comfy.controlnet.ControlNet:
    unet = dict(SD15_UNET if arch == "sd15" else SDXL_UNET)
    for k in ("out_channels", "transformer_depth_output", "use_temporal_resblock", "use_temporal_attention"):
        unet.pop(k, None)
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init,
                                     dtype=torch.float32, device="cpu", **unet)
    _init_weights(net, seed)
    return comfy.controlnet.ControlNet(net, load_device=torch.device("cpu"))


def tiny_t2i_adapter(seed: int = 2) -> comfy.controlnet.T2IAdapter:
    """A T2I adapter whose features match the 'sd15_deep' model's input blocks."""
    width = SD15_UNET["model_channels"]
    adapter = comfy.t2i_adapter.adapter.Adapter(channels=[width] * 4, nums_rb=1, cin=3 * 64, ksize=1, sk=True,
                                                use_conv=False, xl=False)
    _init_weights(adapter, seed)
    return comfy.controlnet.T2IAdapter(adapter, adapter.input_channels, 8, "nearest-exact", device=torch.device("cpu"))


def tiny_control_lora(seed: int = 4) -> comfy.controlnet.ControlLora:
    """A Control-LoRA: the ControlNet-only weights (hint block, zero convs); the rest is taken from the
    diffusion model at pre_run, as ComfyUI does for real Control-LoRA files."""
    net = tiny_controlnet(seed).control_model
    own = ("input_hint_block.", "zero_convs.", "middle_block_out.")
    weights = {k: v for k, v in net.state_dict().items() if k.startswith(own)}
    weights["lora_controlnet"] = torch.tensor([])
    return comfy.controlnet.ControlLora(weights)


def text_cond(seed: int, tokens: int = 77, arch: str = "sd15"):
    """CONDITIONING as a text encoder would give it: [[tensor(1, tokens, dim), {extras}]]."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, tokens, CONTEXT_DIM, generator=g)
    extra = {}
    if arch == "sdxl":
        extra["pooled_output"] = torch.randn(1, 1280, generator=g)
    return [[cond, extra]]


def condition_image(height: int, width: int, seed: int = 3) -> torch.Tensor:
    """An IMAGE (1, H, W, 3) in [0, 1] with structure at every scale: stripes plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.linspace(0, 1, height)[:, None]
    x = torch.linspace(0, 1, width)[None, :]
    base = 0.5 + 0.25 * torch.sin(40 * x + 7 * y) + 0.25 * torch.cos(23 * y - 5 * x)
    img = base[..., None].repeat(1, 1, 3) + 0.1 * torch.rand(height, width, 3, generator=g)
    return img.clamp(0, 1)[None]


def tiny_vae(seed: int = 5):
    """A tiny SD-layout AutoencoderKL (8x downscale, 4 latent channels) wrapped in comfy.sd.VAE."""
    import comfy.ldm.models.autoencoder
    import comfy.sd
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    config = {"params": {"ddconfig": ddconfig, "embed_dim": 4}}
    net = comfy.ldm.models.autoencoder.AutoencoderKL(**config["params"])
    _init_weights(net, seed)
    return comfy.sd.VAE(sd=net.state_dict(), device=torch.device("cpu"), config=config, dtype=torch.float32)


def sample_in_model_dtype(model: comfy.model_patcher.ModelPatcher, dtype: torch.dtype) -> None:
    """Keep the sampler's state (noise, latent, every step) in `dtype` for float64 exactness tests.

    ComfyUI 0.33's CFGGuider.outer_sample casts noise and latent to float32 whatever the latent's dtype
    (comfy/samplers.py: `noise.to(device=device, dtype=torch.float32)`); 0.3.64 kept the latent's dtype.
    Registered with ComfyUI's wrapper API on this test model only (clones carry it), this sampler_sample wrapper
    hands the sampler float64 again; on 0.3.64 it changes nothing. The result still comes back in float32."""
    def in_dtype(executor, guider, sigmas, extra_args, callback, noise, latent_image, *args, **kwargs):
        return executor(guider, sigmas, extra_args, callback, noise.to(dtype), latent_image.to(dtype), *args, **kwargs)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.SAMPLER_SAMPLE, "tests.sample_in_model_dtype",
                               in_dtype)
