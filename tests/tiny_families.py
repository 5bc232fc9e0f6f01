"""Tiny real models of every family the pack supports, with seeded random weights, built inside the real
ComfyUI from config the way ComfyUI builds them (a few hundred thousand parameters each, built in well
under a second):

* SDXL, eps and v-prediction (`supported_models.SDXL`; v-prediction is what ComfyUI's checkpoint loader
  makes of a state dict holding the `v_pred` marker), with ControlNets from ComfyUI's own
  `comfy.controlnet.load_controlnet_state_dict`: a ControlNet (cldm layout) and a Control-LoRA.
* SD3.5 (MMDiT, 16 latent channels, shift 3) with a ControlNet in Stability's SD3.5 layout, also loaded by
  `load_controlnet_state_dict` (it reads the width and depth from the state dict).
* Flux (double- and single-stream blocks, RoPE positions, guidance embedding) with the InstantX, union and
  XLabs ControlNets, and Flux Tools' concat conditioning (a model with 32 input channels, the condition
  latent concatenated as `concat_latent_image`).
* Qwen-Image (5-D latents with one frame) with the InstantX ControlNet, and Qwen-Image Edit with the Fun
  ControlNet (ComfyUI's loader reads its size from the weights).
* ComfyUI 0.33's Flux.2 [dev] and [klein] (128-channel latents at 1/16 with Flux.2's VAE), Z-Image (Lumina 2's
  NextDiT with Z-Image's settings) and its Fun ControlNet (a model patch), Chroma and HiDream.

ComfyUI's loaders for the Flux and Qwen-Image ControlNets detect the model size from fixed numbers
(`model_detection` sets hidden size 3072 whatever the file holds), so no small file can go through them.
Those ControlNets are built here with exactly the classes and arguments the loaders use
(`load_controlnet_flux_instantx`, `load_controlnet_flux_xlabs_mistoline`, `load_controlnet_qwen_instantx`)
on a tiny config; `loader_kind` lets the tests compare them with what the real loader builds from a state
dict holding the detection keys (the loader runs; its full-size weights are left uninitialised and unused).

VAEs: the SD layout (4 channels, SDXL), the same with 16 channels (SD3, Flux), and a tiny Wan 2.1 VAE
(Qwen-Image) loaded by ComfyUI's `comfy.sd.VAE` from its state dict (0.33 reads the width from the file).
"""
from __future__ import annotations

import torch

import comfy.cldm.dit_embedder
import comfy.controlnet
import comfy.latent_formats
import comfy.ldm.flux.controlnet
import comfy.ldm.qwen_image.controlnet
from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed_torch
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.supported_models

from tiny_models import SDXL_UNET, _init_weights

CPU = torch.device("cpu")
OPS = comfy.ops.disable_weight_init

FAMILIES = ("sdxl", "sdxl_v", "sd35", "flux", "qwen", "flux2", "flux2_klein", "zimage", "qwen_edit", "chroma", "hidream")

# text conditioning widths the tiny models are built for
CONTEXT = {"sdxl": 64, "sdxl_v": 64, "sd35": 64, "flux": 64, "qwen": 64, "flux2": 64, "flux2_klein": 96, "zimage": 64,
           "qwen_edit": 64, "chroma": 64, "hidream": 64}
POOLED = {"sdxl": 1280, "sdxl_v": 1280, "sd35": 2048, "flux": 32, "qwen": None, "flux2": None, "flux2_klein": None,
          "zimage": None, "qwen_edit": None, "chroma": None, "hidream": 32}
# pixels per latent cell: Flux.2's VAE latent is 2x2-patchified (128 channels at 1/16)
CELL_PX = {"flux2": 16, "flux2_klein": 16}
HIDREAM_LLAMA_LAYERS = 2  # Llama-3 hidden-state layers the tiny HiDream reads (its llama_layers)

SD35_DEPTH = 2  # MMDiT: hidden size 64 * depth, heads = depth
SD35_UNET = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": SD35_DEPTH, "input_size": None,
    "adm_in_channels": 2048, "pos_embed_max_size": 16, "num_patches": 256, "pos_embed_scaling_factor": None,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 64, "out_features": 64 * SD35_DEPTH}},
    "qk_norm": "rms", "x_block_self_attn_layers": [],
}

FLUX_UNET = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 64,
    "hidden_size": 48, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
    "axes_dim": [4, 10, 10], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
    "txt_ids_dims": [],  # 0.33: which text-id axes carry positions (detection sets [] for Flux)
}

QWEN_UNET = {
    "image_model": "qwen_image", "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 1,
    "attention_head_dim": 24, "num_attention_heads": 2, "joint_attention_dim": 64, "axes_dims_rope": (4, 10, 10),
}
# Qwen-Image Edit 2511: the same network; its reference latents get timestep 0 (what detection reads from the file)
QWEN_EDIT_UNET = dict(QWEN_UNET, default_ref_method="index_timestep_zero")

# Flux.2 [dev] as model_detection sets it (global modulation, SiLU MLP, no biases, 4 RoPE axes with text positions on
# the 4th, reference latents placed by index), tiny; [klein] (Qwen3 text encoder) has no guidance embedding
FLUX2_UNET = {
    "image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None, "context_in_dim": 64,
    "hidden_size": 32, "mlp_ratio": 3.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1,
    "axes_dim": [4, 4, 4, 4], "theta": 2000, "patch_size": 1, "qkv_bias": False, "guidance_embed": True,
    "txt_ids_dims": [3], "global_modulation": True, "mlp_silu_act": True, "ops_bias": False,
    "default_ref_method": "index", "ref_index_scale": 10.0, "yak_mlp": False, "txt_norm": False,
}
FLUX2_KLEIN_UNET = dict(FLUX2_UNET, guidance_embed=False, context_in_dim=96)

# Z-Image (Turbo): Lumina 2's NextDiT with Z-Image's settings from model_detection (dim 3840 there), small: its
# modulation reads a 256-wide timestep embedding, so the width cannot go below 256
ZIMAGE_UNET = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": 64, "n_layers": 1,
    "n_refiner_layers": 1, "qk_norm": True, "n_heads": 4, "n_kv_heads": 4, "axes_dims": [16, 24, 24],
    "axes_lens": [1536, 512, 512], "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True,
    "time_scale": 1000.0, "pad_tokens_multiple": 32,
}

# Chroma: Flux's blocks without modulation weights, driven by the distilled-guidance approximator, tiny
CHROMA_UNET = {
    "image_model": "chroma", "in_channels": 64, "out_channels": 64, "context_in_dim": 64, "hidden_size": 48,
    "mlp_ratio": 2.0, "num_heads": 2, "depth": 1, "depth_single_blocks": 1, "axes_dim": [4, 10, 10], "theta": 10000,
    "patch_size": 2, "qkv_bias": True, "in_dim": 64, "out_dim": 48, "hidden_dim": 32, "n_layers": 1,
    "txt_ids_dims": [], "vec_in_dim": None,
}

# HiDream I1: double- and single-stream MoE blocks reading T5 and per-block Llama-3 hidden states, tiny
HIDREAM_UNET = {
    "image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 1,
    "num_single_layers": 1, "attention_head_dim": 32, "num_attention_heads": 2, "caption_channels": [64, 64],
    "text_emb_dim": 32, "num_routed_experts": 4, "num_activated_experts": 2, "axes_dims_rope": [16, 8, 8],
    "max_resolution": [128, 128], "llama_layers": list(range(HIDREAM_LLAMA_LAYERS)),
}


def _patcher(model):
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


def _built(config, seed, state_dict=None):
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model(state_dict or {}, device="cpu")
    _init_weights(model.diffusion_model, seed)
    return _patcher(model)


def model(family: str, seed: int = 0, in_channels: int | None = None):
    """A ModelPatcher of the family. `in_channels` (Flux only): 32 makes a Flux Tools model that takes the
    condition latent as 16 concatenated channels."""
    if family == "sdxl":
        return _built(comfy.supported_models.SDXL(dict(SDXL_UNET)), seed)
    if family == "sdxl_v":  # ComfyUI's SDXL config turns the `v_pred` marker of a checkpoint into V_PREDICTION
        return _built(comfy.supported_models.SDXL(dict(SDXL_UNET)), seed, {"v_pred": torch.tensor([])})
    if family == "sd35":
        patcher = _built(comfy.supported_models.SD3(dict(SD35_UNET)), seed)
        # the position table SD3 files carry: ComfyUI leaves the buffer uninitialised until a file fills it
        net, size = patcher.model.diffusion_model, SD35_UNET["pos_embed_max_size"]
        with torch.no_grad():
            net.pos_embed.copy_(get_2d_sincos_pos_embed_torch(net.hidden_size, size, size)[None])
        return patcher
    if family == "flux":
        return _built(comfy.supported_models.Flux(dict(FLUX_UNET, in_channels=in_channels or 16)), seed)
    if family == "qwen":
        return _built(comfy.supported_models.QwenImage(dict(QWEN_UNET)), seed)
    if family == "qwen_edit":
        return _built(comfy.supported_models.QwenImage(dict(QWEN_EDIT_UNET)), seed)
    if family in ("flux2", "flux2_klein"):
        return _built(comfy.supported_models.Flux2(dict(FLUX2_UNET if family == "flux2" else FLUX2_KLEIN_UNET)), seed)
    if family == "zimage":
        return _built(comfy.supported_models.ZImage(dict(ZIMAGE_UNET)), seed)
    if family == "chroma":
        return _built(comfy.supported_models.Chroma(dict(CHROMA_UNET)), seed)
    if family == "hidream":
        return _built(comfy.supported_models.HiDream(dict(HIDREAM_UNET)), seed)
    raise ValueError(family)


def text_cond(family: str, seed: int, tokens: int = 12, guidance: float | None = 3.5):
    """CONDITIONING as the family's text encoder gives it: tokens x width, plus the pooled vector where the
    family has one (CLIP-G for SDXL, CLIP-L + CLIP-G for SD3 and HiDream, CLIP-L for Flux), Flux's and Flux.2
    [dev]'s guidance, and HiDream's Llama-3 hidden states (layers x tokens x width)."""
    g = torch.Generator().manual_seed(seed)
    extra = {}
    if POOLED[family] is not None:
        extra["pooled_output"] = torch.randn(1, POOLED[family], generator=g)
    if family in ("flux", "flux2") and guidance is not None:
        extra["guidance"] = guidance
    text = torch.randn(1, tokens, CONTEXT[family], generator=g)
    if family == "hidream":
        extra["conditioning_llama3"] = torch.randn(1, HIDREAM_LLAMA_LAYERS, tokens, CONTEXT[family], generator=g)
    return [[text, extra]]


# --- ControlNets --------------------------------------------------------------------------------

def sdxl_controlnet(seed: int = 1):
    """A ControlNet in the cldm layout, loaded by ComfyUI's own loader (it detects the config from the weights)."""
    unet = {k: v for k, v in SDXL_UNET.items()
            if k not in ("out_channels", "transformer_depth_output", "use_temporal_resblock", "use_temporal_attention")}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=OPS, dtype=torch.float32, device="cpu", **unet)
    _init_weights(net, seed)
    return comfy.controlnet.load_controlnet_state_dict(net.state_dict())


def sdxl_control_lora(seed: int = 4):
    """A Control-LoRA state dict (hint block, zero convs and the `lora_controlnet` marker) through ComfyUI's
    loader; the rest of its weights come from the diffusion model at sampling time."""
    unet = {k: v for k, v in SDXL_UNET.items()
            if k not in ("out_channels", "transformer_depth_output", "use_temporal_resblock", "use_temporal_attention")}
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=OPS, dtype=torch.float32, device="cpu", **unet)
    _init_weights(net, seed)
    own = ("input_hint_block.", "zero_convs.", "middle_block_out.")
    weights = {k: v for k, v in net.state_dict().items() if k.startswith(own)}
    weights["lora_controlnet"] = torch.tensor([])
    return comfy.controlnet.load_controlnet_state_dict(weights)


def sd35_controlnet(seed: int = 1, layers: int = 1):
    """Stability's SD3.5 ControlNet layout through ComfyUI's loader (width and depth read from the weights)."""
    net = comfy.cldm.dit_embedder.ControlNetEmbedder(
        img_size=None, patch_size=2, in_chans=16, num_layers=layers, main_model_double=SD35_DEPTH, double_y_emb=False,
        attention_head_dim=64, num_attention_heads=SD35_DEPTH, adm_in_channels=2048, device="cpu", dtype=torch.float32,
        operations=OPS)
    _init_weights(net, seed)
    return comfy.controlnet.load_controlnet_state_dict(net.state_dict())


def _control(net, seed, **kwargs):
    _init_weights(net, seed)
    return comfy.controlnet.ControlNet(net, load_device=CPU, manual_cast_dtype=None, **kwargs)


def flux_controlnet(kind: str, seed: int = 1):
    """Flux ControlNets as ComfyUI's loaders build them: 'instantx' and 'union' (InstantX layout: VAE-encoded
    hint; union has control-mode embeddings) and 'xlabs' (pixel hint through its own downsampling convs)."""
    config = {k: v for k, v in FLUX_UNET.items() if k != "image_model"}
    if kind in ("instantx", "union"):
        net = comfy.ldm.flux.controlnet.ControlNetFlux(latent_input=True, num_union_modes=10 if kind == "union" else 0,
                                                       control_latent_channels=16, operations=OPS, device="cpu",
                                                       dtype=torch.float32, **config)
        return _control(net, seed, compression_ratio=1, latent_format=comfy.latent_formats.Flux(),
                        extra_conds=["y", "guidance"])
    if kind == "xlabs":
        net = comfy.ldm.flux.controlnet.ControlNetFlux(mistoline=False, operations=OPS, device="cpu", dtype=torch.float32,
                                                       **dict(config, depth_single_blocks=0))
        return _control(net, seed, extra_conds=["y", "guidance"])
    raise ValueError(kind)


def qwen_controlnet(seed: int = 1):
    """Qwen-Image InstantX ControlNet as `load_controlnet_qwen_instantx` builds it (VAE-encoded hint)."""
    config = {k: v for k, v in QWEN_UNET.items() if k != "image_model"}
    net = comfy.ldm.qwen_image.controlnet.QwenImageControlNetModel(extra_condition_channels=0, operations=OPS,
                                                                     device="cpu", dtype=torch.float32, **config)
    return _control(net, seed, compression_ratio=1, latent_format=comfy.latent_formats.Wan21(), extra_conds=[])


def qwen_fun_controlnet(seed: int = 2):
    """Qwen-Image's Fun ControlNet (VAE-encoded hint, run with the base model's own blocks) through ComfyUI's own
    loader, which reads its width and heads from the weights: tiny, the width of the tiny Qwen-Image."""
    config = {k: v for k, v in QWEN_UNET.items() if k != "image_model"}
    inner = config["attention_head_dim"] * config["num_attention_heads"]
    net = comfy.ldm.qwen_image.controlnet.QwenImageFunControlNetModel(
        control_in_features=132, inner_dim=inner, num_attention_heads=config["num_attention_heads"],
        attention_head_dim=config["attention_head_dim"], operations=OPS, device="cpu", dtype=torch.float32)
    _init_weights(net, seed)
    return comfy.controlnet.load_controlnet_state_dict(net.state_dict())


def control_kind(control) -> dict:
    """What makes a ControlNet of its kind: the classes and the settings its loader chooses."""
    model = control.control_model
    return {"class": type(control).__name__, "model": type(model).__name__,
            "latent_format": type(control.latent_format).__name__ if control.latent_format is not None else None,
            "compression_ratio": control.compression_ratio, "extra_conds": sorted(set(control.extra_conds)),
            "concat_mask": control.concat_mask, "latent_input": getattr(model, "latent_input", None),
            "union_modes": getattr(model, "num_union_modes", None), "mistoline": getattr(model, "mistoline", None)}


def loader_kind(kind: str) -> dict:
    """`control_kind` of what ComfyUI's real `load_controlnet_state_dict` builds from a state dict holding only the
    keys its detection reads (full-size shapes; the weights are allocated but never initialised or run)."""
    hidden, sd = 3072, {}
    z = lambda *shape: torch.zeros(shape)  # noqa: E731
    if kind in ("instantx", "union"):  # diffusers layout, as InstantX ships it
        sd = {"controlnet_blocks.0.weight": z(hidden, hidden), "controlnet_x_embedder.weight": z(hidden, 64),
              "controlnet_x_embedder.bias": z(hidden), "x_embedder.weight": z(hidden, 64), "x_embedder.bias": z(hidden),
              "transformer_blocks.0.attn.norm_k.weight": z(128),
              "time_text_embed.text_embedder.linear_1.weight": z(hidden, 768)}
        if kind == "union":
            sd["controlnet_mode_embedder.weight"] = z(10, hidden)
    elif kind == "xlabs":
        sd = {"controlnet_blocks.0.weight": z(hidden, hidden), "double_blocks.0.img_attn.norm.key_norm.scale": z(128),
              "img_in.weight": z(hidden, 64), "vector_in.in_layer.weight": z(hidden, 768)}
    elif kind == "qwen":
        sd = {"controlnet_blocks.0.weight": z(hidden, hidden), "transformer_blocks.0.img_mlp.net.0.proj.weight": z(4 * hidden, hidden),
              "controlnet_x_embedder.weight": z(hidden, 64), "txt_norm.weight": z(3584), "img_in.weight": z(hidden, 64)}
    else:
        raise ValueError(kind)
    with torch.device("meta"):  # shapes only: the full-size modules never allocate memory
        return control_kind(comfy.controlnet.load_controlnet_state_dict(sd))


# --- VAEs ---------------------------------------------------------------------------------------

def vae(family: str, seed: int = 5):
    """The family's VAE, tiny: the SD layout with 4 (SDXL) or 16 (SD3, Flux, Z-Image, Chroma, HiDream: Flux's
    VAE) latent channels; Qwen-Image's Wan 2.1 VAE (3-D causal convolutions, one frame); Flux.2's VAE."""
    if family in ("qwen", "qwen_edit"):
        return _wan_vae(seed)
    if family in ("flux2", "flux2_klein"):
        return _flux2_vae(seed)
    channels = 4 if family.startswith("sdxl") else 16
    import comfy.ldm.models.autoencoder
    ddconfig = {"double_z": True, "z_channels": channels, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    config = {"params": {"ddconfig": ddconfig, "embed_dim": channels}}
    net = comfy.ldm.models.autoencoder.AutoencoderKL(**config["params"])
    _init_weights(net, seed)
    out = comfy.sd.VAE(sd=net.state_dict(), device=CPU, config=config, dtype=torch.float32)
    out.latent_channels = channels
    return out


def _wan_vae(seed: int):
    """A tiny Wan 2.1 VAE through ComfyUI's own VAE loader: 0.33 reads the width from the file
    (`decoder.head.0.gamma`); the channel multipliers and block counts are its fixed ones."""
    import comfy.ldm.wan.vae
    net = comfy.ldm.wan.vae.WanVAE(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], dropout=0.0)
    _init_weights(net, seed)
    return comfy.sd.VAE(sd=net.state_dict(), device=CPU, dtype=torch.float32)


def _flux2_vae(seed: int):
    """Flux.2's VAE through ComfyUI's own VAE loader: the SD layout with 32 latent channels and a batch norm over
    2x2 patches (`bn.running_mean`: 128 channels at 1/16 scale). The loader fixes the encoder's width (128) and
    reads the decoder's from the file: the encoder is full size (38 M parameters, ~0.5 s per 64x192 image here),
    the decoder tiny."""
    import comfy.ldm.models.autoencoder
    encoder = {"double_z": True, "z_channels": 32, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
               "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
               "batch_norm_latent": True}
    net = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=encoder, embed_dim=32, decoder_ddconfig=dict(encoder, ch=32))
    _init_weights(net, seed)
    return comfy.sd.VAE(sd=net.state_dict(), device=CPU, dtype=torch.float32)


def cell_px(family: str) -> int:
    """Pixels per latent cell of the family's VAE."""
    return CELL_PX.get(family, 8)
