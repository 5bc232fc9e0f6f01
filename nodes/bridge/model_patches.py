"""Control images that ComfyUI 0.33's model patches hold on the MODEL (comfy_extras/nodes_model_patch.py), cut
to windows.

A model-patch ControlNet (ModelPatchLoader -> Apply Qwen Image DiffSynth ControlNet / Apply Z-Image Fun
ControlNet) is an object in `transformer_options["patches"]` holding the whole control image; called inside the
model, it resizes that image to whatever latent the call gets and VAE-encodes it, so a window would get the whole
canvas squashed into it. Each batch of windows gets a copy of the patch instead, holding the windows' own VAE
encodings of their crops of the image (resized to the canvas as the patch would resize it for a full-canvas
call), stacked like the latents; at every call the copy gets them repeated for the cond / uncond chunks ComfyUI
batched. The user's patch objects are never modified. Patches without a spatial input (USO's style tokens) are
left as they are; spatial ones this module does not cut are refused with a message (`refuse_unwindowed`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.utils

from ...sampling import gather

# spatial model patches ControlSync cannot cut per window: class name -> what the user applied and why
_REFUSED = {
    "SUPIRPatch": "a SUPIR patch (Apply SUPIR Patch) holds the canvas's encoded image for its fixed SDXL-size "
                  "control encoder, and its restore_cfg pulls the canvas prediction toward it",
    "WanUni3CCnetPatch": "a Wan Uni3C ControlNet (Apply Wan Uni3C ControlNet) guides a video's camera from a "
                         "rendered video",
    "MultiTalkGetAttnMapPatch": "InfiniteTalk / MultiTalk (Wan) reads per-person masks of the whole video frame",
    "AnimaLLLitePatch": "an Anima LLLite patch (Apply Anima LLLite) encodes the whole control image in its own "
                        "network",
}


def patch_objects(model_options):
    """(list name, position, owner object) of every patch in transformer_options["patches"]: a bound method's
    object, the callable of a (class, callable) pair, or the patch itself."""
    patches = (model_options.get("transformer_options") or {}).get("patches") or {}
    for name, entries in patches.items():
        for k, p in enumerate(entries if isinstance(entries, (list, tuple)) else ()):
            fn = p[-1] if isinstance(p, tuple) else p
            yield name, k, getattr(fn, "__self__", fn)


def spatial_patches(model_options) -> list:
    """The model patches this module cuts to windows."""
    return [obj for _, _, obj in patch_objects(model_options) if type(obj).__name__ in _WINDOWED]


def refuse_unwindowed(model_options) -> None:
    for _, _, obj in patch_objects(model_options):
        why = _REFUSED.get(type(obj).__name__)
        if why is not None:
            raise ValueError(f"model: {why}; ControlSync windows cannot give each window its part of it. Sample "
                             f"this MODEL without the patch, or without ControlSync.")


def patch_modules(model_options) -> list:
    """The torch modules of the model patches (their MODEL_PATCH networks), for the gradient passes: they run
    inside the diffusion model's forward."""
    out, seen = [], set()
    for _, _, obj in patch_objects(model_options):
        models = getattr(obj, "models", None)
        for m in (models() if callable(models) else ()):
            module = m.model if isinstance(m, comfy.model_patcher.ModelPatcher) else m
            if isinstance(module, torch.nn.Module) and id(module) not in seen:
                seen.add(id(module))
                out.append(module)
    return out


class WindowPatches:
    """Per run: each spatial model patch's per-window encodings and one copy per batch of windows."""

    def __init__(self, plan):
        self.plan = plan
        self.canvas = {}     # (id(tensor), mode, size) -> (tensor, resized to the canvas)
        self.encoded = {}    # (id(patch), region index) -> the window's encoding
        self.copies = {}     # (id(patch), batch, B) -> (patch, _WindowCopy)

    def options(self, model_options, batch, B):
        """`model_options` with each spatial model patch replaced by the batch's copy (the same copy wherever
        one patch is registered twice: Z-Image's is a noise-refiner and a double-block patch); unchanged when
        there is none."""
        found = [(n, k, obj) for n, k, obj in patch_objects(model_options) if type(obj).__name__ in _WINDOWED]
        if not found:
            return model_options
        transformer_options = dict(model_options["transformer_options"])
        patches = {n: list(v) for n, v in transformer_options["patches"].items()}
        for name, k, obj in found:
            patches[name][k] = self._copy(obj, tuple(batch), B)
        transformer_options["patches"] = patches
        return {**model_options, "transformer_options": transformer_options}

    def _copy(self, patch, batch, B):
        key = (id(patch), batch, B)
        if key not in self.copies:
            window = _WINDOWED[type(patch).__name__]
            parts = [comfy.utils.repeat_to_batch_size(self._encoding(patch, i, window), B) for i in batch]
            h, w = self.plan.regions[batch[0]].size
            px = patch.vae.spacial_compression_encode()
            self.copies[key] = (patch, _WindowCopy(patch, window.field, torch.cat(parts), (h * px, w * px)))
        return self.copies[key][1]

    def _encoding(self, patch, i, window):
        key = (id(patch), i)
        if key not in self.encoded:
            px = patch.vae.spacial_compression_encode()
            crops = {name: self._crop(getattr(patch, name), i, how, px) for name, how in window.crops.items()}
            # the VAE may push the diffusion model out of memory: put back what was loaded, as the patches do
            loaded = comfy.model_management.loaded_models(only_currently_used=True)
            self.encoded[key] = window.encode(copy.copy(patch), **crops)
            comfy.model_management.load_models_gpu(loaded)
        return self.encoded[key]

    def _crop(self, t, i, how, px):
        """Region i's part of `t` after resizing it to the canvas as the patch resizes it for a full-canvas call."""
        if t is None:
            return None
        spatial = t.movedim(-1, 1) if how.image else t
        k = px if how.pixels else 1
        H, W = self.plan.canvas[0] * k, self.plan.canvas[1] * k
        key = (id(t), how, H, W)
        if key not in self.canvas:
            self.canvas[key] = (t, comfy.utils.common_upscale(spatial, W, H, how.mode, how.crop))
        out = gather(self.canvas[key][1], self.plan.regions[i].scaled(k))
        return out.movedim(1, -1) if how.image else out

    def close(self):
        self.copies.clear()
        self.encoded.clear()
        self.canvas.clear()


class _WindowCopy:
    """A copy of a model patch holding a batch of windows' encodings (`field`); called with a model input of
    chunks x windows samples, it gets them repeated per chunk (ComfyUI stacks cond and uncond chunks, each
    window-major like the encodings)."""

    def __init__(self, patch, field, stacked, size_px):
        self.patch = copy.copy(patch)
        self.patch.encoded_image_size = size_px  # the window's size: the patch never re-encodes
        self.patch.temp_data = None
        self.field, self.stacked = field, stacked

    def __call__(self, kwargs):
        x = kwargs["x"]
        n, stacked = x.shape[0], self.stacked.to(x.device)
        if n % stacked.shape[0]:
            raise ValueError(f"model patch: a call of {n} samples for {stacked.shape[0]} window encodings")
        # a new tensor at every call: made outside inference mode in a gradient pass, autograd may save it
        setattr(self.patch, self.field, stacked.repeat((n // stacked.shape[0],) + (1,) * (stacked.ndim - 1)))
        return self.patch(kwargs)

    def to(self, device_or_dtype):
        if isinstance(device_or_dtype, torch.device):
            self.stacked = self.stacked.to(device_or_dtype)
            self.patch.to(device_or_dtype)
        return self

    def models(self):
        return self.patch.models()


@dataclass(frozen=True)
class _Resize:
    """How a patch resizes one of its inputs for a call: common_upscale's mode and crop, to the latent's pixels
    (else its cells); `image`: an IMAGE (B, H, W, C), else a mask of any rank ending in (H, W)."""
    mode: str
    crop: str
    pixels: bool = True
    image: bool = False


@dataclass(frozen=True)
class _Window:
    """How one kind of patch is cut: its inputs cropped after resizing them to the canvas as the patch does, the
    window's encoding made by the patch's own methods (on a copy holding the crops), the attribute it goes into."""
    crops: dict
    encode: object
    field: str = "encoded_image"


def _encode_diffsynth(patch, image, mask):
    # DiffSynthCnetPatch resizes the image with "area" / "center" and stretches its mask to the latent
    # ("bilinear" / "none"): the copy gets the window's part of each at those sizes, which it resizes to themselves
    patch.mask = mask
    return patch.model_patch.model.process_input_latent_image(patch.encode_latent_cond(image))


def _encode_zimage(patch, image, inpaint_image, mask):
    # ZImageControlPatch resizes image and inpaint image with "area" / "center" and its mask "bilinear" /
    # "center" to the inpaint image (and "nearest" to the latent: the same cells when the mask has the canvas's
    # pixel size)
    patch.mask = mask
    return patch.encode_latent_cond(image, inpaint_image)


_IMAGE = _Resize("area", "center", image=True)
_WINDOWED = {
    "DiffSynthCnetPatch": _Window({"image": _IMAGE, "mask": _Resize("bilinear", "none", pixels=False)},
                                  _encode_diffsynth),
    "ZImageControlPatch": _Window({"image": _IMAGE, "inpaint_image": _IMAGE, "mask": _Resize("bilinear", "center")},
                                  _encode_zimage),
}
