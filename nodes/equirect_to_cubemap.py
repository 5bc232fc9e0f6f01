"""EquirectToCubemap: an equirectangular condition (or photo) as the cubemap strip the cubemap graph samples."""
from __future__ import annotations

from comfy_api.latest import io

from ..sampling import PlanError
from ..sampling.cubemap import equirect_to_cube
from .cubemap_layout import convert_image, layout_input
from .schema import schema


class EquirectToCubemap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ControlSyncEquirectToCubemap",
            display_name="Equirectangular to Cubemap (360)",
            search_aliases=("360", "equirectangular", "cubemap", "panorama", "skybox"),
            category="sampling/controlsync",
            description="Turns an equirectangular 360 image (a depth, line-art or segmentation condition, or a "
                        "photo) into a cubemap strip of 6 square faces (left, front, right, back, up, down): the "
                        "canvas of Factor Graph Collage's 'cubemap' graph, ready for Apply ControlNet. Other 360 "
                        "tools' layouts (horizon, dice, a batch of faces) on request.",
            inputs=[
                io.Image.Input("image", tooltip="An equirectangular image, twice as wide as high (360 x 180 degrees)."),
                io.Int.Input("face_size", default=512, min=64, max=8192, step=8,
                             tooltip="Side of each cube face in pixels: the cubemap graph's face size (512 for SD1.5 "
                                     "windows of one face)."),
                layout_input("layout", "The cubemap layout to produce: 'strip' for the cubemap graph and "
                                       "Apply ControlNet, the others for other 360 tools.", optional=True),
            ],
            outputs=[io.Image.Output(tooltip="The cubemap: a strip 6 faces wide, or the chosen layout.")],
        )

    @classmethod
    def execute(cls, image, face_size=512, layout="strip") -> io.NodeOutput:
        h, w = image.shape[1:3]
        if abs(w - 2 * h) > 1:
            raise ValueError(f"image: an equirectangular image is twice as wide as high (360 x 180 degrees); got "
                             f"{w}x{h}. Pad or resize it to {2 * h}x{h}.")
        if face_size % 8:
            raise ValueError(f"face_size: must be a multiple of 8 px (a latent cell), got {face_size}")
        try:
            strip = equirect_to_cube(image.movedim(-1, 1).float(), face_size)
        except PlanError as e:
            raise ValueError(str(e)) from None
        return io.NodeOutput(convert_image(strip.movedim(1, -1).clamp(0, 1), "strip", layout))
