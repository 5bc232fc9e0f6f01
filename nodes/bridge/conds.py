"""Conds cut to windows: latents-shaped masks and model conds, area conds intersected, per-region prompts, and
real ControlBase copies holding each window's crop of the canvas-sized hint."""
from __future__ import annotations

import torch

import comfy.conds
import comfy.samplers
import comfy.utils

from ...sampling import gather
from ...sampling.conditioning import crop_origins, window_size_conditioning
from .model_facts import SIZE_CONDITIONED, latent_geometry

# pre-run state that ControlBase.copy() does not carry over (set by pre_run on the originals)
_CONTROL_RUN_STATE = ("timestep_range", "model_sampling_current", "control_model", "manual_cast_dtype")


def stack_regions(canvas: torch.Tensor, regions, batch: int) -> torch.Tensor:
    """The regions of `canvas` stacked window-major along dim 0, each broadcast to `batch`."""
    parts = [gather(canvas, r) for r in regions]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([comfy.utils.repeat_to_batch_size(p, batch) for p in parts])


def window_adm(model, cond: dict, y, plan, indices, batch: int, pooled=None):
    """The `y` model cond of the regions `indices`, computed by the model's own encode_adm with each region's
    pooled text embedding (per-factor prompts: SDXL, SD3, Flux) and, for SDXL, its size conditioning
    (sampling/conditioning.py: window_size_conditioning), stacked like the latents."""
    px, origins = latent_geometry(model)[0], crop_origins(plan)
    parts = []
    for i in indices:
        kwargs = dict(cond)
        if isinstance(model, SIZE_CONDITIONED):
            kwargs.update(window_size_conditioning(cond, origins[i], plan.regions[i].size, plan.canvas, px))
        if pooled:
            kwargs["pooled_output"] = pooled[i]
        parts.append(comfy.utils.repeat_to_batch_size(model.encode_adm(**kwargs), batch))
    return y._copy_with(torch.cat(parts).to(y.cond.device, y.cond.dtype))


class WindowConds:
    """Conds cropped to a batch of regions: latents-shaped masks and model conds, area conds intersected,
    per-region prompts, and one chain of ControlNet copies per batch holding the batch's hint crops.
    Crops are made once per region and run; nothing of the user's conds or ControlNets is modified."""

    def __init__(self, plan, model):
        self.plan, self.model = plan, model
        self.canvas_hints = {}    # id(control) -> (control, canvas-sized hint, px per cell)
        self.hint_crops = {}      # (id(control), region) -> (hint crop, extra concat crops)
        self.controls = {}        # (id(control), batch, B) -> (control, chain copy)
        self.texts = {}           # (id(positive entry), region) -> the region's prompt as the model takes it

    def crop(self, cond_list, batch, B, role, device=None):
        out = []
        for d in cond_list:
            w = self._crop_one(d, batch, B, role, device)
            if w is not None:
                out.append(w)
        return out

    def _crop_one(self, d, batch, B, role, device):
        if "gligen" in d:
            raise ValueError("positive/negative: GLIGEN box conditioning is placed on the whole canvas and "
                             "cannot be split into ControlSync windows; remove the GLIGEN node.")
        regions = [self.plan.regions[i] for i in batch]
        w = dict(d)
        if "area" in d:
            area = _window_area(d["area"], regions[0])
            if area is None:
                return None
            w["area"] = area
        if d.get("mask") is not None:
            w["mask"] = stack_regions(self._canvas_sized(d["mask"], "mask"), regions, B)
        if d.get("model_conds"):
            w["model_conds"] = {k: self._window_model_cond(v, regions, B) for k, v in d["model_conds"].items()}
            prompted = role == "positive" and self.plan.prompts and "area" not in d and d.get("mask") is None
            if prompted and d.get("conditioning_llama3") is not None:
                raise ValueError("plan: per-factor prompts give each factor its own text embedding and pooled vector; "
                                 "this prompt (HiDream) also carries Llama-3 hidden states, which a plan does not hold "
                                 "per factor, so every factor would keep the positive prompt's. Use prompt_mode 'one "
                                 "for all' with HiDream.")
            if prompted:
                w["model_conds"]["c_crossattn"] = self._region_prompt(d, d["model_conds"].get("c_crossattn"), batch, B)
            pooled = self.plan.pooled if prompted and self.plan.pooled else None
            y = w["model_conds"].get("y")
            if y is not None and "unclip_conditioning" not in d and (pooled or isinstance(self.model, SIZE_CONDITIONED)):
                w["model_conds"]["y"] = window_adm(self.model, d, y, self.plan, batch, B, pooled)
        if d.get("control") is not None:
            w["control"] = self._control_chain(d["control"], batch, B, device)
        return w

    def _canvas_sized(self, t, name):
        if tuple(t.shape[-2:]) != self.plan.canvas:
            raise ValueError(f"positive/negative: a conditioning {name} of size {tuple(t.shape[-2:])} does not "
                             f"match the canvas latent {self.plan.canvas}")
        return t

    def _window_model_cond(self, c, regions, B):
        if isinstance(c, comfy.conds.CONDNoiseShape) and tuple(c.cond.shape[-2:]) == self.plan.canvas:
            return c._copy_with(stack_regions(c.cond, regions, B))
        if isinstance(c, comfy.conds.CONDList):
            # reference latents (ReferenceLatent: Flux Kontext, Flux.2, Qwen-Image Edit, Z-Image Omni): one of the
            # canvas latent's size describes the canvas (the image being edited), so each window gets its crop,
            # like a ControlNet hint; any other size (a subject, a style) is given whole to every window
            return c._copy_with([stack_regions(t, regions, B) if torch.is_tensor(t) and tuple(t.shape[-2:]) == self.plan.canvas
                                 else t for t in c.cond])
        return c

    def _region_prompt(self, d, original, batch, B):
        """The regions' own text embeddings in place of the positive prompt's, stacked like the latents."""
        if original is None:
            raise ValueError("plan: per-factor prompts need a model that takes text embeddings (c_crossattn)")
        device, dtype = original.cond.device, original.cond.dtype
        parts = [original._copy_with(self._model_text(d, i, device).to(device, dtype)) for i in batch]
        if len(parts) == 1:
            return parts[0]
        # CONDCrossAttn.concat pads differing token counts the way ComfyUI batches prompts
        stacked = [original._copy_with(comfy.utils.repeat_to_batch_size(p.cond, B)) for p in parts]
        return original._copy_with(stacked[0].concat(stacked[1:]))

    def _model_text(self, d, i, device):
        """Region i's prompt as the model takes a prompt: converted by the model's own extra_conds with the positive
        entry's other settings, as ComfyUI converts the positive prompt (Flux.2 pads every prompt to 512 tokens)."""
        key = (id(d), i)
        if key not in self.texts:
            latent_format = self.model.latent_format
            frames = (1,) if getattr(latent_format, "latent_dimensions", 2) == 3 else ()
            noise = torch.zeros((1, latent_format.latent_channels) + frames + self.plan.regions[i].size, device=device)
            entry = {k: v for k, v in d.items() if k != "model_conds"}
            entry.update(cross_attn=self.plan.prompts[i], model_conds={})
            (converted,) = comfy.samplers.encode_model_conds(self.model.extra_conds, [entry], noise, device, "positive",
                                                             latent_image=noise)
            self.texts[key] = converted["model_conds"]["c_crossattn"].cond
        return self.texts[key]

    def _control_chain(self, control, batch, B, device=None):
        """One chain of ControlBase copies per batch of regions, shared by every cond carrying `control`
        (ComfyUI batches cond with uncond only when they carry the same control object); copied from the
        instance ComfyUI's MultiGPU made for `device` (its chain links to that device's instances)."""
        if device is not None:
            control = control.get_instance_for_device(device)
        key = (id(control), batch, B)
        if key not in self.controls:
            chain, node = [], control
            while node is not None:
                copy = node.copy()
                for name in _CONTROL_RUN_STATE:
                    if hasattr(node, name) and getattr(copy, name, None) is None:
                        setattr(copy, name, getattr(node, name))
                crops = [self._hint_crop(node, i) for i in batch]
                hint = crops[0][0] if len(batch) == 1 else torch.cat([comfy.utils.repeat_to_batch_size(c[0], B) for c in crops])
                extra = [torch.cat([comfy.utils.repeat_to_batch_size(c[1][k], B) for c in crops]) if len(batch) > 1
                         else crops[0][1][k] for k in range(len(node.extra_concat_orig))]
                copy.set_cond_hint(hint, strength=node.strength, timestep_percent_range=node.timestep_percent_range,
                                   vae=node.vae, extra_concat=extra)
                chain.append(copy)
                node = node.previous_controlnet
            for a, b in zip(chain, chain[1:]):
                a.set_previous_controlnet(b)
            self.controls[key] = (control, chain[0])
        return self.controls[key][1]

    def _hint_crop(self, control, i):
        key = (id(control), i)
        if key not in self.hint_crops:
            hint, ratio = self._canvas_hint(control)
            region = self.plan.regions[i].scaled(ratio)
            extra = [gather(_resize_like_comfy(e, hint.shape[-2:], control.upscale_algorithm), region)
                     for e in control.extra_concat_orig]
            self.hint_crops[key] = (gather(hint, region), extra)
        return self.hint_crops[key]

    def _canvas_hint(self, control):
        """The hint resized to the canvas exactly as ComfyUI would resize it for a full-canvas call."""
        if id(control) not in self.canvas_hints:
            H, W = self.plan.canvas
            ratio = control.compression_ratio
            if control.vae is not None:
                ratio *= control.vae.spacial_compression_encode()
            hint = control.cond_hint_original
            check_hint_aspect(tuple(hint.shape[-2:]), (H * ratio, W * ratio))
            self.canvas_hints[id(control)] = (control, _resize_like_comfy(hint, (H * ratio, W * ratio), control.upscale_algorithm), ratio)
        _, hint, ratio = self.canvas_hints[id(control)]
        return hint, ratio

    def close(self):
        for _, head in self.controls.values():
            head.cleanup()
        self.controls.clear()
        self.hint_crops.clear()
        self.canvas_hints.clear()
        self.texts.clear()


def _resize_like_comfy(image, hw, algorithm):
    return comfy.utils.common_upscale(image, hw[1], hw[0], algorithm, "center")


def check_hint_aspect(hint_hw, canvas_hw) -> None:
    """Refuse a hint that ComfyUI's center crop would cut by a latent cell or more at canvas scale."""
    (hh, hw), (ch, cw) = hint_hw, canvas_hw
    hint_aspect, canvas_aspect = hw / hh, cw / ch
    if hint_aspect > canvas_aspect:
        cut_px = (1 - canvas_aspect / hint_aspect) * cw
    else:
        cut_px = (1 - hint_aspect / canvas_aspect) * ch
    if cut_px >= 8:
        raise ValueError(
            f"ControlNet image: the condition image is {hw}x{hh} (aspect {hint_aspect:.3f}) but the canvas is "
            f"{cw}x{ch} (aspect {canvas_aspect:.3f}); ComfyUI would center-crop {cut_px:.0f} px of the condition "
            f"away. Resize or pad the condition image to the canvas aspect, or plan the canvas from the image.")


def _window_area(area, region):
    """A resolved (h, w, y, x) area intersected with the window, in window coordinates; None if disjoint."""
    if len(area) != 4:
        raise ValueError("positive/negative: only 2-D conditioning areas can be split into windows")
    rect = region.rect
    if rect is None:
        raise ValueError("positive/negative: area conditioning cannot follow a region that wraps around the "
                         "canvas; use a mask (ConditioningSetMask) instead")
    h, w, y, x = area
    ry, rx, rh, rw = rect
    y0, y1 = max(y, ry), min(y + h, ry + rh)
    x0, x1 = max(x, rx), min(x + w, rx + rw)
    if y1 <= y0 or x1 <= x0:
        return None
    return (y1 - y0, x1 - x0, y0 - ry, x0 - rx)
