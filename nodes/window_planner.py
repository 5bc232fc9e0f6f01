"""WindowPlanner: where the windows go, shown over the condition image before any GPU time is spent."""
from __future__ import annotations

import torch
from comfy_api.latest import io, ui

import comfy.utils

from ..sampling import PlanError, WindowPlan
from ..sampling.plans import POSITIONS
from ..sampling.preview import draw_plan
from . import bridge
from .schema import WindowPlanType, schema

PREVIEW_MAX_SIDE = 2048
LATENT_CELL_PX = 8  # an empty LATENT carries no VAE factor; SD1.5/SDXL/SD3/Flux all use 8


class WindowPlanner(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="WindowPlanner",
            display_name="Window Planner (panorama, MultiDiffusion)",
            search_aliases=("panorama", "tiled diffusion", "MultiDiffusion", "SyncDiffusion", "windows", "large image"),
            category="sampling/controlsync",
            is_output_node=True,  # its preview shows on the node, also when queued on its own
            description="Cuts a large canvas into overlapping model-sized windows for ControlSync Sampler. "
                        "The preview draws the windows (anchor tinted pink) over the condition image; the latent "
                        "output is a matching empty latent.",
            inputs=[
                io.Int.Input("width", default=3072, min=64, max=16384, step=8,
                             tooltip="Canvas width in pixels. Ignored when a latent or an image is connected."),
                io.Int.Input("height", default=512, min=64, max=16384, step=8,
                             tooltip="Canvas height in pixels. Ignored when a latent or an image is connected."),
                io.Int.Input("window_width", default=512, min=64, max=16384, step=8,
                             tooltip="Width of one window: the size the model was trained on (512 for SD1.5, 1024 for SDXL)."),
                io.Int.Input("window_height", default=512, min=64, max=16384, step=8,
                             tooltip="Height of one window: the size the model was trained on."),
                io.Int.Input("stride", default=64, min=8, max=16384, step=8,
                             tooltip="Pixels between neighbouring windows (MultiDiffusion: 64; SyncDiffusion: 128). "
                                     "Smaller strides mean more overlap, smoother results and more model calls. The last "
                                     "window sits flush with the far edge, so every pixel is covered."),
                io.Combo.Input("anchor", options=["first", "middle", "index"], default="first",
                               tooltip="The window the others are synchronised to by AnchorSync: the first (ControlSync "
                                       "paper), the middle one (SyncDiffusion code), or anchor_index."),
                io.Int.Input("anchor_index", default=0, min=0, max=100000,
                             tooltip="Anchor window number (row-major, from 0) when anchor is 'index'."),
                io.Combo.Input("blend", options=["uniform", "feather"], default="uniform",
                               tooltip="How overlapping windows are averaged: uniform (MultiDiffusion) or feather "
                                       "(weights ramp down over the overlap toward each window's edge)."),
                *canvas_inputs(),
                positions_input(),
            ],
            outputs=plan_outputs("windows"),
        )

    @classmethod
    def execute(cls, width, height, window_width, window_height, stride, anchor, anchor_index, blend,
                image=None, latent=None, positions="window-local") -> io.NodeOutput:
        height, width = canvas_size(width, height, image, latent)
        return plan_output(cls, lambda: WindowPlan((height, width), (window_height, window_width),
                                                               (stride, stride), anchor, anchor_index, blend,
                                                               positions),
                           image, latent)


def positions_input():
    return io.Combo.Input("positions", options=list(POSITIONS), default="window-local", optional=True,
                          tooltip="DiTs (Flux, Flux.2, Z-Image): window-local gives each window the positions of an "
                                  "image of its size (MultiDiffusion); canvas-global gives it its own positions in the "
                                  "canvas, as a model call on the whole canvas would (ComfyUI's rope_options; one "
                                  "window per model call). Loops and cubemaps keep window-local.")


def canvas_inputs():
    """The optional sockets a planner takes its canvas size (and preview background) from."""
    return [io.Image.Input("image", optional=True,
                           tooltip="The condition image (canny, depth, ...): the canvas takes its size (rounded to "
                                   "8 px) unless a latent is connected, and the preview draws over it."),
            io.Latent.Input("latent", optional=True,
                            tooltip="A latent to sample: the canvas takes its size (8 px per latent cell).")]


def plan_outputs(regions: str):
    return [WindowPlanType.Output(display_name="plan", tooltip="Connect to ControlSync Sampler (or Windowed Model)."),
            io.Image.Output(display_name="preview", tooltip=f"The {regions} over the canvas; the anchor is tinted pink."),
            io.Latent.Output(display_name="latent", tooltip="The connected latent, or an empty latent of the canvas size.")]


def plan_output(node, make_plan, image=None, latent=None) -> io.NodeOutput:
    """The plan (checked by laying it out at 8 px per cell), its preview - also shown on the node itself -
    and the canvas latent."""
    try:
        plan = make_plan()
        layout = plan.layout(tuple(v // LATENT_CELL_PX for v in plan.canvas_px), LATENT_CELL_PX)
    except PlanError as e:
        raise ValueError(f"{node.define_schema().node_id}: {e}") from None
    drawing = preview(layout, image)
    return io.NodeOutput(plan, drawing, latent or empty_latent(*plan.canvas_px), ui=ui.PreviewImage(drawing, cls=node))


def canvas_size(width, height, image=None, latent=None) -> tuple[int, int]:
    """(height, width) in pixels: from the latent if connected, else the image (rounded to 8 px), else the widgets."""
    if latent is not None:
        samples = latent["samples"]
        if samples.ndim != 4:
            raise ValueError(f"latent: expected an image latent (batch, channels, height, width), got shape {tuple(samples.shape)}")
        height, width = samples.shape[-2] * LATENT_CELL_PX, samples.shape[-1] * LATENT_CELL_PX
        if image is not None:
            bridge.check_hint_aspect(tuple(image.shape[1:3]), (height, width))
    elif image is not None:
        height, width = (max(8, round(v / 8) * 8) for v in image.shape[1:3])
    return height, width


def empty_latent(height, width):
    # 4 channels: ComfyUI's samplers widen an all-zero latent to the model's channel count
    return {"samples": torch.zeros(1, 4, height // LATENT_CELL_PX, width // LATENT_CELL_PX)}


def preview(layout, image=None):
    """The plan's regions drawn over the condition image (or grey), at most PREVIEW_MAX_SIDE px."""
    height, width = (v * LATENT_CELL_PX for v in layout.canvas)
    scale = min(1.0, PREVIEW_MAX_SIDE / max(height, width))
    ph, pw = max(1, round(height * scale)), max(1, round(width * scale))
    if image is not None:
        background = comfy.utils.common_upscale(image[:1].movedim(-1, 1), pw, ph, "bilinear", "center").movedim(1, -1)[0]
    else:
        background = torch.full((ph, pw, 3), 0.5)
    return draw_plan(background.float().clamp(0, 1), layout, LATENT_CELL_PX * scale, thickness=max(2, round(3 * scale)))[None]
