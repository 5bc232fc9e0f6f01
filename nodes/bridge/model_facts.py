"""What the pack reads off a MODEL: its latent geometry, its sampling space, and what it refuses."""
from __future__ import annotations

import comfy.model_base
import comfy.model_sampling

from ...sampling import PlanError
from .model_patches import refuse_unwindowed, spatial_patches

# models whose adm vector carries SDXL's size conditioning (original size, crop, target size)
SIZE_CONDITIONED = (comfy.model_base.SDXL, comfy.model_base.SDXLRefiner)


def latent_geometry(model) -> tuple[int, int]:
    """(pixels per latent cell, latent cells a window side must be a multiple of) for a ModelPatcher
    or BaseModel, read from the model instead of assuming SD's 8x VAE."""
    base = getattr(model, "model", model)
    factor = getattr(base.latent_format, "spacial_downscale_ratio", 8)
    patch = getattr(base.diffusion_model, "patch_size", 1)
    return int(factor), int(patch) if isinstance(patch, int) and patch > 0 else 1


def parameterisation(model) -> str:
    """The space the model samples in, read from its model_sampling (after any ModelSampling* node's patch):
    "ve" (eps, v-prediction, x0, EDM: x = x0 + sigma eps) or "flow" (CONST: x = (1 - sigma) x0 + sigma eps);
    see sampling/sync.py. A ModelPatcher or a BaseModel."""
    sampling = model.get_model_object("model_sampling") if hasattr(model, "get_model_object") else model.model_sampling
    kinds = ((comfy.model_sampling.CONST, "flow"), (comfy.model_sampling.EPS, "ve"))
    for cls, name in kinds:
        # the sampler's space is set by noise_scaling: a subclass that redefines it is another space
        if isinstance(sampling, cls) and type(sampling).noise_scaling is cls.noise_scaling:
            return name
    names = [c.__name__ for c in type(sampling).__mro__ if c.__module__ == comfy.model_sampling.__name__] or [type(sampling).__name__]
    raise ValueError(f"sync: AnchorSync steps in the model's own parameterisation and knows eps / v-prediction "
                     f"(x = x0 + sigma eps) and flow matching (CONST: x = (1 - sigma) x0 + sigma eps); this MODEL "
                     f"samples with {' + '.join(names)}. Sample it without AnchorSync (leave sync empty).")


def layout_for(plan, model, latent_shape):
    """The plan laid out on a latent of `latent_shape` for this model (a ModelPatcher or BaseModel)."""
    # 2-D images; models with video latents (Qwen-Image: Wan's VAE) take an image as one frame (B, C, 1, H, W)
    if not (len(latent_shape) == 4 or (len(latent_shape) == 5 and latent_shape[2] == 1)):
        raise ValueError(f"latent_image: ControlSync plans are 2-D images; got a latent of shape {tuple(latent_shape)} "
                         f"({len(latent_shape) - 2} spatial dims)")
    factor, multiple = latent_geometry(model)
    try:
        return plan.layout(tuple(latent_shape[-2:]), factor, multiple)
    except PlanError as e:
        raise ValueError(f"plan / latent_image: {e}") from None


def refuse_unsupported(model_options: dict) -> None:
    """Model options windows cannot run under, refused with what to do instead."""
    refuse_unwindowed(model_options)
    if model_options.get("context_handler") is not None:
        raise ValueError("model: ComfyUI's context windows are active on this MODEL (a context-window node is "
                         "upstream); they do not crop ControlNet hints and cannot be combined with ControlSync "
                         "windows. Remove the context-window node, or sample without ControlSync.")
    if len(model_options.get("multigpu_clones") or ()) > 1 and spatial_patches(model_options):
        raise ValueError("model: this MODEL samples on several GPUs (MultiGPU CFG Split) and carries a model-patch "
                         "ControlNet, whose network ComfyUI keeps on the main GPU only. Remove the MultiGPU node, or "
                         "apply the ControlNet as a regular ControlNet.")
    if "sampler_calc_cond_batch_function" in model_options:
        raise ValueError("model: a node upstream replaces ComfyUI's cond batching (sampler_calc_cond_batch_function); "
                         "ControlSync windows run inside it and cannot be combined with that node.")
    for fn in model_options.get("sampler_post_cfg_function", []):
        if getattr(fn, "__module__", "").endswith("nodes_sag"):
            raise ValueError("model: Self-Attention Guidance reads one attention map for the whole latent; with "
                             "ControlSync windows it would see one window's map stretched over the canvas. Remove the "
                             "Self-Attention Guidance node (Perturbed-Attention Guidance works per window).")


def refuse_for_sync(model_options: dict) -> None:
    """Guidance that keeps state between calls cannot be called on windows by the gradient passes: APG's
    momentum is a running average over the canvas's predictions (comfy_extras/nodes_apg.py)."""
    for fn in model_options.get("sampler_pre_cfg_function", []):
        momentum = _closure_value(fn, "momentum")
        if getattr(fn, "__module__", "").endswith("nodes_apg") and momentum not in (None, 0, 0.0):
            raise ValueError(f"sync: Adaptive Projected Guidance with momentum {momentum} keeps a running average "
                             f"of the whole canvas's guidance; AnchorSync's gradient passes call the guidance on "
                             f"single windows and would mix them into it. Set APG's momentum to 0, or disconnect "
                             f"sync.")


def _closure_value(fn, name):
    code = getattr(fn, "__code__", None)
    if code is None or fn.__closure__ is None:
        return None
    cells = dict(zip(code.co_freevars, fn.__closure__))
    try:
        return cells[name].cell_contents if name in cells else None
    except ValueError:  # an empty cell
        return None
