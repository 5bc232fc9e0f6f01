"""ControlSyncLowPass: a low-resolution image the result's low-pass is kept at (upscaling, super-resolution)."""
from __future__ import annotations

from comfy_api.latest import io

from . import bridge
from .schema import GuideType, schema


class ControlSyncLowPass(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ControlSyncLowPass",
            display_name="Low-pass Guide (upscale, super-resolution)",
            search_aliases=("upscale", "super-resolution", "tile", "img2img", "DiffCollage", "faithful", "colour shift"),
            category="sampling/controlsync",
            description="Keeps the result faithful to a low-resolution image y while the windows add detail: every "
                        "step, the canvas's x0-prediction downsampled onto y's grid (area averaging, any size ratio) "
                        "is pulled to y, jointly over the whole canvas - DiffCollage's conditional generation for "
                        "super-resolution (appendix C.1), by Replacement (the projection H+ y + (I - H+ H) x0, as in "
                        "ILVR / DDRM) or Reconstruction (a gradient step on ||H x0 - y||^2). Connect it to ControlSync "
                        "Sampler's or ControlSync Windowed Model's guide input; any plan kind but the autoregressive "
                        "order.",
            inputs=[
                io.Image.Input("image", tooltip="y: the low-resolution image, e.g. the image before upscaling; any size "
                                                "up to the canvas, with the canvas's aspect (stretched onto it, it "
                                                "must land less than a latent cell off)."),
                io.Vae.Input("vae", tooltip="The model's VAE: encodes y stretched onto the canvas (latent space) or "
                                            "decodes the result (pixels)."),
                io.Combo.Input("method", options=list(bridge.GUIDE_METHODS), default="replacement",
                               tooltip="replacement: every step the x0-prediction's low-pass is replaced by y's (the "
                                       "projection; the result's low-pass ends exactly on y). reconstruction: a "
                                       "gradient step toward y through the model (softer; weight sets its strength)."),
                io.Combo.Input("space", options=list(bridge.GUIDE_SPACES), default="latent",
                               tooltip="latent: compare in latent space, the canvas latent averaged onto y's latent "
                                       "grid against y's (cheap). pixels: decode the x0-prediction tile by tile and "
                                       "compare the downsampled image with y itself (reconstruction only: a decoder "
                                       "has no pseudo-inverse; per step four tiled decodes of the canvas, one with its backward pass)."),
                io.Float.Input("weight", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Reconstruction's step w over the observation's gain (DiffCollage's lambda = "
                                       "w / 2g): 1 reaches y in one step where the model's Jacobian is the identity; "
                                       "0 turns the pull off. Ignored by replacement."),
            ],
            outputs=[GuideType.Output(display_name="guide",
                                      tooltip="Connect to ControlSync Sampler's or Windowed Model's guide input.")],
        )

    @classmethod
    def execute(cls, image, vae, method="replacement", space="latent", weight=1.0) -> io.NodeOutput:
        if vae is None or getattr(vae, "first_stage_model", None) is None:
            raise ValueError("vae: the Low-pass Guide needs the model's VAE (with an encoder and a decoder); none was given")
        if image.ndim != 4 or image.shape[1] < 1 or image.shape[2] < 1:
            raise ValueError(f"image: expected an IMAGE (batch, height, width, channels), got shape {tuple(image.shape)}")
        if space == "pixels" and method == "replacement":
            raise ValueError("method / space: replacement projects the x0-prediction onto y with H's pseudo-inverse, "
                             "and through a decoder there is none; use reconstruction in pixels, or replacement in "
                             "latent space")
        return io.NodeOutput(bridge.GuideSettings(image, vae, method, space, float(weight)))
