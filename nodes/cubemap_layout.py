"""CubemapLayout: a cubemap image from one layout to another (other 360 tools' layouts <-> the pack's strip)."""
from __future__ import annotations

from comfy_api.latest import io

from ..sampling import PlanError
from ..sampling.cubemap import LAYOUTS, convert_cube_layout
from .schema import schema

LAYOUT_HELP = "; ".join(f"{name}: {what}" for name, what in LAYOUTS.items())


def layout_input(name: str, tooltip: str, optional: bool = False):
    return io.Combo.Input(name, options=list(LAYOUTS), default="strip", optional=optional,
                          tooltip=f"{tooltip} {LAYOUT_HELP}.")


def convert_image(image, source: str, target: str, what: str = "image"):
    """An IMAGE (batch, height, width, channels) cubemap from layout `source` to `target`."""
    try:
        return convert_cube_layout(image.movedim(-1, 1), source, target).movedim(1, -1)
    except PlanError as e:
        raise ValueError(f"{what}: {e}") from None


class CubemapLayout(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ControlSyncCubemapLayout",
            display_name="Cubemap Layout (360)",
            search_aliases=("cubemap", "360", "skybox", "cross", "dice", "horizon", "equirectangular", "panorama"),
            category="sampling/controlsync",
            description="Rearranges a cubemap between the layouts 360 tools use: the pack's strip (left, front, right, "
                        "back, up, down: the canvas the cubemap graph samples), pytorch360convert / py360convert's "
                        "horizon strip (front, right, back, left, up, down), the 4x3 dice cross, and a batch of 6 "
                        "face images. Faces keep their orientation; only where they sit changes. Convert a cubemap "
                        "condition from another tool to 'strip' before Apply ControlNet and the collage.",
            inputs=[
                io.Image.Input("image", tooltip="A cubemap image in the `source` layout."),
                layout_input("source", "The layout of the image."),
                layout_input("target", "The layout to produce."),
            ],
            outputs=[io.Image.Output(tooltip="The same cubemap in the target layout.")],
        )

    @classmethod
    def execute(cls, image, source, target) -> io.NodeOutput:
        return io.NodeOutput(convert_image(image, source, target))
