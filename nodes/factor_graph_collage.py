"""FactorGraphCollage: DiffCollage factor graphs (chains, seamless loops, grids, 360 cubemaps) for ControlSync Sampler."""
from __future__ import annotations

from dataclasses import replace

from comfy_api.latest import io

from ..sampling.conditional import METHODS, ORDERS
from ..sampling.conditioning import VARIABLE_PROMPTS, along_chain, same_length
from ..sampling.collage import GRAPHS, FactorGraphPlan
from .cubemap_layout import convert_image, layout_input
from .schema import schema
from .window_planner import LATENT_CELL_PX, canvas_inputs, canvas_size, plan_output, plan_outputs, positions_input


PROMPT_MODES = ("one for all", "per factor", "interpolate")


def encode(clip, text):
    """(text embedding, pooled embedding or None) as CLIP Text Encode gives them."""
    return clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)


class FactorGraphCollage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="FactorGraphCollage",
            display_name="Factor Graph Collage (DiffCollage, 360 loop)",
            search_aliases=("DiffCollage", "panorama", "seamless", "360", "loop", "cubemap", "outpainting", "tiled diffusion"),
            category="sampling/controlsync",
            is_output_node=True,  # its preview shows on the node, also when queued on its own
            description="DiffCollage: the canvas as a factor graph of model-sized pieces. Every step the model "
                        "denoises each factor and each overlap, and the canvas prediction is sum(factors) - "
                        "sum((degree-1) * overlaps): exact for tree-shaped graphs, where plain averaging is not. "
                        "chain: long images; cycle: a horizontal loop that wraps with no seam (360 panoramas); "
                        "grid: any height and width; corner_grid: the paper's grid, factors meeting only at their corners; "
                        "cubemap: a full 360 environment as 6 square faces (a strip "
                        "left, front, right, back, up, down), the paper's graph of three 4-face loops. Sampled by "
                        "ControlSync Sampler, with ControlNet crops and AnchorSync like window plans.",
            inputs=[
                io.Combo.Input("graph", options=list(GRAPHS), default="chain",
                               tooltip="chain: factors in a row (long images); cycle: a loop whose last factor overlaps "
                                       "the first (seamless horizontal wrap); grid: factors overlapping on all sides (counting numbers "
                                       "over their intersections); corner_grid: the DiffCollage paper's grid - square factors "
                                       "tiling the canvas plus a second tiling half a window in, each factor meeting 4 others "
                                       "at its corners (needs window_width = window_height = 2 x overlap and a canvas a "
                                       "multiple of the window); cubemap: a 360 cube "
                                       "(three loops of 4 faces; convert with Cubemap to Equirectangular)."),
                io.Int.Input("width", default=2048, min=64, max=16384, step=8,
                             tooltip="Canvas width in pixels (cubemap: the width of one face; the canvas is 6 faces "
                                     "wide). Ignored when a latent or an image is connected."),
                io.Int.Input("height", default=512, min=64, max=16384, step=8,
                             tooltip="Canvas height in pixels (cubemap: the height of one face, equal to its width). "
                                     "Ignored when a latent or an image is connected."),
                io.Int.Input("window_width", default=512, min=64, max=16384, step=8,
                             tooltip="Width of one factor: the model's training size."),
                io.Int.Input("window_height", default=512, min=64, max=16384, step=8,
                             tooltip="Height of one factor. Chains and loops running horizontally need it equal to "
                                     "the canvas height; cubemaps to the face size."),
                io.Int.Input("overlap", default=256, min=0, max=16384, step=8,
                             tooltip="Pixels shared by neighbouring factors (the DiffCollage paper: half a window). For "
                                     "a loop the canvas width (a cubemap: 4 faces) must be a multiple of window_width - overlap. Above 0 "
                                     "whenever there are several factors: the overlaps are what ties them together. "
                                     "corner_grid: half the window (the corner overlaps are a quarter window)."),
                io.Combo.Input("direction", options=["horizontal", "vertical"], default="horizontal",
                               tooltip="Chains only: left to right, or top to bottom."),
                io.Int.Input("anchor_index", default=0, min=0, max=100000,
                             tooltip="The factor AnchorSync synchronises the others to (from 0, in reading order; a "
                                     "cubemap: the windows of the loops LFRB, ULDR, UFDB in turn)."),
                io.Combo.Input("prompt_mode", options=list(PROMPT_MODES), default="one for all",
                               tooltip="one for all: every factor uses the sampler's positive prompt. per factor: one "
                                       "line of 'prompts' per factor, in order. interpolate: factors move from the first "
                                       "line to the last by spherical interpolation (slerp) of the text embeddings. A cubemap takes "
                                       "one prompt per face: left, front, right, back, up, down."),
                io.String.Input("prompts", multiline=True, default="", optional=True,
                                tooltip="One prompt per line (needs the clip input). ControlNets, masks and the negative "
                                        "prompt still come from the sampler's conditioning."),
                io.Combo.Input("variable_prompts", options=list(VARIABLE_PROMPTS), default="mean", optional=True,
                               tooltip="What the overlaps are denoised with: the mean of their factors' prompt "
                                       "embeddings, or the empty (null) prompt."),
                io.Clip.Input("clip", optional=True, tooltip="The text encoder for 'prompts'."),
                io.Combo.Input("known_pixels", options=list(METHODS), default="replacement", optional=True,
                               tooltip="Outpainting / inpainting (a latent with a noise mask, e.g. from VAE Encode + "
                                       "Set Latent Noise Mask): how the known pixels are kept. replacement: the "
                                       "x0-prediction is projected onto them every step (ComfyUI's noise mask). "
                                       "reconstruction: the gradient of ||H x0 - y||^2 through the model pulls every "
                                       "factor toward them (smoother blending; one extra backward pass per factor "
                                       "holding known pixels)."),
                io.Float.Input("reconstruction_weight", default=1.0, min=0.0, max=100.0, step=0.05, optional=True,
                               tooltip="w of reconstruction: x0 - (w/2) grad ||H x0 - y||^2 (Video Diffusion Models' "
                                       "guidance). 1 reaches the known pixels as the noise vanishes; more pulls harder."),
                io.Combo.Input("order", options=list(ORDERS), default="joint", optional=True,
                               tooltip="joint: DiffCollage, every factor denoised together each step (the fast, "
                                       "coherent way). autoregressive: the paper's baseline, one factor after another, "
                                       "each a full sampling run outpainting from the pixels known so far."),
                *canvas_inputs(),
                io.Conditioning.Input("factor_conditioning", optional=True,
                                      tooltip="Instead of prompts + clip: the factors' prompts as conditioning, one "
                                              "entry per factor in order (a cubemap: per face) - CLIP Text Encode nodes "
                                              "joined by Conditioning (Combine), each combine putting its second input "
                                              "after the first. Any text encoder or LoRA'd CLIP works; only the text "
                                              "embeddings are used."),
                layout_input("cubemap_layout", "Cubemap graph only: the layout of the connected image, which is "
                                               "rearranged into the strip the graph samples (canvas size and "
                                               "preview). The latent and the ControlNet condition are always the "
                                               "strip: convert a condition from another tool with Cubemap Layout "
                                               "before Apply ControlNet.", optional=True),
                positions_input(),
            ],
            outputs=plan_outputs("factors"),
        )

    @classmethod
    def execute(cls, graph, width, height, window_width, window_height, overlap, direction, anchor_index,
                prompt_mode="one for all", prompts="", variable_prompts="mean", clip=None, known_pixels="replacement",
                reconstruction_weight=1.0, order="joint", image=None, latent=None,
                factor_conditioning=None, cubemap_layout="strip", positions="window-local") -> io.NodeOutput:
        if graph == "cubemap" and image is not None:
            image = convert_image(image, cubemap_layout, "strip")
        if graph == "cubemap":
            height, width = cubemap_canvas(width, height, image, latent)
        else:
            height, width = canvas_size(width, height, image, latent)

        def make_plan():
            plan = FactorGraphPlan(graph, (height, width), (window_height, window_width), overlap, direction,
                                   anchor_index, variable_prompt=variable_prompts, known_pixels=known_pixels,
                                   reconstruction_weight=reconstruction_weight, order=order, positions=positions)
            if prompt_mode == "one for all":
                return plan
            latent_hw = (height // LATENT_CELL_PX, width // LATENT_CELL_PX)
            return replace(plan, **factor_prompts(plan, latent_hw, prompt_mode, prompts, variable_prompts, clip,
                                                  factor_conditioning))
        return plan_output(cls, make_plan, image, latent)


def cubemap_canvas(width, height, image=None, latent=None) -> tuple[int, int]:
    """(height, width) of the strip of 6 faces: from a connected strip latent or image, else the face widgets."""
    if latent is None and image is None:
        if width != height:
            raise ValueError(f"width / height: cubemap faces must be square; got a {width}x{height} px face")
        return height, 6 * width
    height, width = canvas_size(width, height, image, latent)
    if width != 6 * height:
        source = "latent" if latent is not None else "image"
        raise ValueError(f"{source}: a cubemap canvas is a strip of 6 square faces (left, front, right, back, up, "
                         f"down), 6 times as wide as high; got {width}x{height} px. Convert an equirectangular "
                         f"image with Equirectangular to Cubemap (ControlSync).")
    return height, width


def factor_prompts(plan, latent_hw, mode, prompts, variable_prompts, clip, conditioning=None) -> dict:
    """The factors' text embeddings: encoded from the lines of `prompts`, or taken from `conditioning`'s entries."""
    lines = [line.strip() for line in (prompts or "").splitlines() if line.strip()]
    count = plan.factor_count(latent_hw, LATENT_CELL_PX)
    per = "face (left, front, right, back, up, down)" if plan.graph == "cubemap" else "factor"
    if conditioning is not None:
        if lines:
            raise ValueError("prompts / factor_conditioning: give the factors' prompts one way, as text lines or as "
                             "conditioning entries, not both")
        embeddings, source = [entry[0] for entry in conditioning], "factor_conditioning has {} entries"
        pooled = [entry[1].get("pooled_output") for entry in conditioning]
    else:
        if clip is None:
            raise ValueError(f"clip: prompt_mode '{mode}' encodes the prompts itself: connect the CLIP of your checkpoint "
                             f"(or give factor_conditioning)")
        embeddings, source = None, "prompts has {} non-empty lines"
    given = len(conditioning) if conditioning is not None else len(lines)
    if mode == "per factor" and given != count:
        raise ValueError(f"{'factor_conditioning' if conditioning is not None else 'prompts'}: prompt_mode 'per factor' "
                         f"needs one {'entry' if conditioning is not None else 'line'} per {per}: the graph has {count} "
                         f"but {source.format(given)}")
    if mode == "interpolate" and plan.graph == "cubemap":
        raise ValueError("prompt_mode: 'interpolate' runs along a chain or loop; a cubemap takes 'per factor' "
                         "prompts, one per face: left, front, right, back, up, down")
    if mode == "interpolate" and given < 2:
        raise ValueError(f"prompts: prompt_mode 'interpolate' needs at least two (first and last scene), but "
                         f"{source.format(given)}")
    if embeddings is None:
        embeddings, pooled = (list(t) for t in zip(*(encode(clip, line) for line in lines)))
    if any(p is None for p in pooled):  # a text encoder without a pooled output (or a model that takes none)
        pooled = []
    if mode == "interpolate":
        embeddings = along_chain(same_length(embeddings, "prompts: 'interpolate'"), count)
        pooled = along_chain(pooled, count) if pooled else []
    null = null_pooled = None
    if variable_prompts == "null":
        if clip is None:
            raise ValueError("clip: variable_prompts 'null' encodes the empty prompt: connect the CLIP of your checkpoint")
        null, null_pooled = encode(clip, "")
        if null_pooled is None:
            pooled = []
    return {"factor_prompts": tuple(embeddings), "null_prompt": null, "factor_pooled": tuple(pooled),
            "null_pooled": null_pooled if pooled else None}
