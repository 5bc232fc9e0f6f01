"""CubemapToEquirect: a cubemap strip as the equirectangular (360 x 180 degree) image viewers expect."""
from __future__ import annotations

from comfy_api.latest import io

from ..sampling import PlanError
from ..sampling.cubemap import check_strip, cube_to_equirect
from .cubemap_layout import convert_image, layout_input
from .schema import schema


class CubemapToEquirect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ControlSyncCubemapToEquirect",
            display_name="Cubemap to Equirectangular (360)",
            search_aliases=("360", "equirectangular", "cubemap", "panorama", "skybox"),
            category="sampling/controlsync",
            description="Turns a cubemap - the pack's strip of 6 square faces (left, front, right, back, up, down: "
                        "what Factor Graph Collage's 'cubemap' graph samples) or another 360 tool's layout (horizon, "
                        "dice, a batch of faces) - into an equirectangular 360 image, twice as wide as high, front at "
                        "the centre and the seam at the back, bilinear across face edges.",
            inputs=[
                io.Image.Input("image", tooltip="The decoded cubemap: a strip 6 times as wide as high, or the layout "
                                                "set below."),
                io.Int.Input("height", default=0, min=0, max=16384, step=2,
                             tooltip="Height of the equirectangular image in pixels (its width is twice that); 0: "
                                     "twice the face size, which keeps the faces' detail at the equator."),
                layout_input("layout", "The layout of the cubemap image (Loop VAE Decode gives a 'strip').", optional=True),
            ],
            outputs=[io.Image.Output(tooltip="The 360 x 180 degree equirectangular image, twice as wide as high, "
                                             "front at the centre and the seam at the back: what 360 viewers open.")],
        )

    @classmethod
    def execute(cls, image, height=0, layout="strip") -> io.NodeOutput:
        image = convert_image(image, layout, "strip")
        try:
            check_strip(tuple(image.shape[1:3]), "image")
        except PlanError as e:
            raise ValueError(str(e)) from None
        out = cube_to_equirect(image.movedim(-1, 1).float(), height or None)
        return io.NodeOutput(out.movedim(1, -1).clamp(0, 1))
