"""CubemapToEquirect: a cubemap strip as the equirectangular (360 x 180 degree) image viewers expect."""
from __future__ import annotations

from comfy_api.latest import io

from ..sampling import PlanError
from ..sampling.cubemap import check_strip, cube_to_equirect


class CubemapToEquirect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlSyncCubemapToEquirect",
            display_name="Cubemap to Equirectangular (ControlSync)",
            category="sampling/controlsync",
            description="Turns a cubemap strip (6 square faces: left, front, right, back, up, down - the layout "
                        "Factor Graph Collage's 'cubemap' graph samples) into an equirectangular 360 image, twice as "
                        "wide as high, front at the centre, bilinear across face edges.",
            inputs=[
                io.Image.Input("image", tooltip="The decoded cubemap strip (6 times as wide as high)."),
                io.Int.Input("height", default=0, min=0, max=16384, step=2,
                             tooltip="Height of the equirectangular image in pixels (its width is twice that); 0: "
                                     "twice the face size, which keeps the faces' detail at the equator."),
            ],
            outputs=[io.Image.Output(tooltip="The 360 x 180 degree equirectangular image.")],
        )

    @classmethod
    def execute(cls, image, height=0) -> io.NodeOutput:
        try:
            check_strip(tuple(image.shape[1:3]), "image")
        except PlanError as e:
            raise ValueError(str(e)) from None
        out = cube_to_equirect(image.movedim(-1, 1).float(), height or None)
        return io.NodeOutput(out.movedim(1, -1).clamp(0, 1))
