"""Tiny real models for the pack's ComfyUI 0.33 features (model-patch ControlNets, canvas-global positions), built
from 0.33's configs inside the real ComfyUI with seeded random weights:

* Flux as 0.33's model_detection configures it (tests/tiny_families.py's config with 0.33's `txt_ids_dims`);

* Qwen-Image (tests/tiny_families.py's) with Qwen-Image's DiffSynth block-wise ControlNet
  (`QwenImageBlockWiseControlNet`, as ModelPatchLoader builds it, one block per main block; 4 extra input
  channels for the inpainting variant that reads a mask) and a tiny Wan 2.1 VAE through ComfyUI's VAE loader;
* Z-Image (Lumina 2's NextDiT with Z-Image's settings from model_detection, 256 wide: its modulation reads a
  256-wide timestep embedding) with the Z-Image Fun ControlNet (`ZImage_Control`, the loader's class: v1, and
  v2.1 with its noise-refiner control and the inpainting channels) and the Flux VAE.

ModelPatchLoader sizes its networks with fixed full-size numbers (3072 / 3840 wide, 60 / 30 blocks), so no small
file can go through it: the patches are built here with its classes, operations and ModelPatcher on a tiny config.
"""
from __future__ import annotations

import torch

import comfy.ldm.lumina.controlnet
import comfy.ldm.wan.vae
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.supported_models

import tiny_families as tf
from tiny_models import _init_weights

CPU = torch.device("cpu")

ZIMAGE_UNET = tf.ZIMAGE_UNET


def _model_patch(net, seed):
    """What ModelPatchLoader returns: the network in ComfyUI's CoreModelPatcher."""
    _init_weights(net, seed)
    return comfy.model_patcher.CoreModelPatcher(net, load_device=CPU, offload_device=CPU)


def qwen():
    return tf.model("qwen")


def flux(seed: int = 0):
    return tf.model("flux", seed)


def zimage(seed: int = 0):
    return tf.model("zimage", seed)


def text_cond(seed: int, tokens: int = 12, width: int = 64):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, width, generator=g), {}]]


def diffsynth_controlnet(seed: int = 7, inpaint: bool = False):
    """Qwen-Image DiffSynth ControlNet: ModelPatchLoader's QwenImageBlockWiseControlNet on the tiny Qwen-Image's
    width (48) and block count (1); the inpainting variant reads 4 more input channels (a mask)."""
    import comfy_extras.nodes_model_patch as mp
    inner = tf.QWEN_UNET["attention_head_dim"] * tf.QWEN_UNET["num_attention_heads"]
    net = mp.QwenImageBlockWiseControlNet(num_layers=tf.QWEN_UNET["num_layers"], in_dim=64,
                                          additional_in_dim=4 if inpaint else 0, dim=inner, device=CPU,
                                          dtype=torch.float32, operations=comfy.ops.manual_cast)
    return _model_patch(net, seed)


def zimage_controlnet(seed: int = 8, version: str = "1"):
    """Z-Image Fun ControlNet as ModelPatchLoader configures it: v1 (control layers only), v2.1 (3 control layers,
    noise-refiner control, 17 extra channels: a mask cell and the inpaint image's latent)."""
    config = {"n_control_layers": 2}
    if version == "2.1":
        config = {"n_control_layers": 3, "additional_in_dim": 17, "refiner_control": True}
    net = comfy.ldm.lumina.controlnet.ZImage_Control(dim=ZIMAGE_UNET["dim"], n_heads=ZIMAGE_UNET["n_heads"],
                                                     n_kv_heads=ZIMAGE_UNET["n_kv_heads"], device=CPU,
                                                     dtype=torch.float32, operations=comfy.ops.manual_cast, **config)
    return _model_patch(net, seed)


def wan_vae(seed: int = 5):
    return tf.vae("qwen", seed)


def flux_vae(seed: int = 5):
    return tf.vae("flux", seed)
