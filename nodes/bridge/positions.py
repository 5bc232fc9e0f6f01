"""Canvas-global positions for DiT windows (a plan's `positions`): each window's model call gets ComfyUI 0.33's
`transformer_options["rope_options"]` shifted by the window's offset in the canvas, so its image tokens carry the
RoPE positions they have in a call on the whole canvas.

`rope_options` is one shift per model call (comfy/ldm/flux/model.py `process_img`, comfy/ldm/lumina/model.py
`pos_ids_x`: the shift is added to every sample's ids), so a batch holds only windows at one offset
(passes.batches_of); a plan's windows all sit at different offsets, so canvas-global windows run one per call.
A ScaleROPE node's scale and shift on the MODEL are kept: the window's shift is added in its scaled units.
"""
from __future__ import annotations

import comfy.ldm.flux.model
import comfy.ldm.lumina.model

from .model_facts import latent_geometry

# the diffusion models ControlSync shifts (tested: tests/test_positions.py): Flux (Flux.1, Kontext, Flux.2 and
# their subclasses) and Lumina 2's NextDiT (Lumina 2, Z-Image), which read rope_options when they compute their
# image ids. Qwen-Image, Chroma, HiDream, SD3 and the UNets read none.
_READS_ROPE_OPTIONS = (comfy.ldm.flux.model.Flux, comfy.ldm.lumina.model.NextDiT)


def canvas_global(plan) -> bool:
    return getattr(plan, "positions", "window-local") == "canvas-global"


def check_model(plan, model) -> None:
    """Refuse canvas-global positions for a model whose positions rope_options does not move."""
    if not canvas_global(plan):
        return
    net = model.get_model_object("diffusion_model")
    if not isinstance(net, _READS_ROPE_OPTIONS):
        raise ValueError(f"plan: positions 'canvas-global' shifts the RoPE positions of each window's model call "
                         f"through ComfyUI's rope_options, which this MODEL ({type(net).__name__}) does not read "
                         f"(Flux, Flux.2 and Z-Image / Lumina 2 do). Set the plan's positions to 'window-local'.")


def offset(plan, i) -> tuple[int, int] | None:
    """Region i's offset in the canvas (latent cells) when positions are canvas-global, else None."""
    if not canvas_global(plan):
        return None
    y, x, _, _ = plan.regions[i].rect
    return y, x


def window_options(model_options, plan, batch, model) -> dict:
    """`model_options` whose rope_options move the batch's image ids to the batch's offset in the canvas."""
    if not canvas_global(plan):
        return model_options
    offsets = {offset(plan, i) for i in batch}
    if len(offsets) != 1:
        raise ValueError(f"positions: one model call holds windows at {len(offsets)} canvas offsets; rope_options "
                         f"shifts a whole call")
    (y, x), patch = offsets.pop(), latent_geometry(model)[1]
    transformer_options = dict(model_options.get("transformer_options") or {})
    rope = dict(transformer_options.get("rope_options") or {})
    rope["shift_y"] = rope.get("shift_y", 0.0) + rope.get("scale_y", 1.0) * y / patch
    rope["shift_x"] = rope.get("shift_x", 0.0) + rope.get("scale_x", 1.0) * x / patch
    transformer_options["rope_options"] = rope
    return {**model_options, "transformer_options": transformer_options}
