"""LoopDecode: VAE decode of a seamless loop or a 360 cubemap with no seam where edges meet."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..sampling import PlanError
from ..sampling.cubemap import RINGS, check_strip, crossing_weight, ring_strip
from .schema import schema

LAYOUTS = ("loop", "cubemap")


def wrap_pad(samples: torch.Tensor, cells: int) -> torch.Tensor:
    """The latent with `cells` columns of its other end on each side (it is periodic along the width)."""
    return torch.cat([samples[..., -cells:], samples, samples[..., :cells]], dim=-1)


class LoopDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ControlSyncLoopDecode",
            display_name="Loop VAE Decode (seamless 360)",
            search_aliases=("seamless", "360", "panorama", "tileable", "cubemap", "VAE decode"),
            category="sampling/controlsync",
            description="Decodes a seamless horizontal loop (a Factor Graph Collage 'cycle', a 360 panorama) or a "
                        "360 cubemap so no seam appears after decoding: the decoder sees what continues across each "
                        "edge (the loop's other end; a cube face's neighbouring faces) instead of a hard image "
                        "border, and that padding is cropped away.",
            inputs=[
                io.Latent.Input("samples", tooltip="The loop's latent (periodic along its width), or a cubemap strip "
                                                   "of 6 faces (left, front, right, back, up, down)."),
                io.Vae.Input("vae", tooltip="The VAE to decode with."),
                io.Int.Input("wrap_cells", default=8, min=1, max=512,
                             tooltip="Latent cells borrowed across each edge (8 = 64 px for SD): the decoder's view "
                                     "across the seam. More costs a little more decoding."),
                io.Combo.Input("layout", options=list(LAYOUTS), default="loop", optional=True,
                               tooltip="loop: the left and right edges meet (Factor Graph Collage 'cycle'). cubemap: "
                                       "each face is decoded with its cube neighbours around it (graph 'cubemap')."),
            ],
            outputs=[io.Image.Output(tooltip="The decoded image; a loop's left and right edges continue each other, "
                                             "a cubemap's faces continue across every cube edge.")],
        )

    @classmethod
    def execute(cls, samples, vae, wrap_cells=8, layout="loop") -> io.NodeOutput:
        latent = samples["samples"]
        if not (latent.ndim == 4 or (latent.ndim == 5 and latent.shape[2] == 1)):  # video VAEs: one frame
            raise ValueError(f"samples: expected an image latent (batch, channels, height, width), got {tuple(latent.shape)}")
        if layout == "cubemap":
            return io.NodeOutput(decode_cubemap(latent, vae, wrap_cells))
        if wrap_cells > latent.shape[-1]:
            raise ValueError(f"wrap_cells: {wrap_cells} is wider than the latent ({latent.shape[-1]} columns)")
        images = decode(vae, wrap_pad(latent, wrap_cells))
        px = images.shape[-2] // (latent.shape[-1] + 2 * wrap_cells)
        return io.NodeOutput(images[..., wrap_cells * px: (wrap_cells + latent.shape[-1]) * px, :])


def decode(vae, latent):
    images = vae.decode(latent)
    if images.ndim == 5:  # video VAEs return (batch, frames, ...)
        images = images.reshape(-1, *images.shape[-3:])
    return images


def decode_cubemap(latent, vae, cells):
    """Each of the three 4-face loops decoded as a loop (wrap padding), so each of the cube's 12 edges,
    which lie on exactly one loop, is decoded in one piece; every face, on two loops, is blended from
    both with weights that reach 1 at the edges its loop crosses (the decoder need not be equivariant
    to quarter turns for the edges to match)."""
    try:
        size = check_strip(tuple(latent.shape[-2:]), "samples")
    except PlanError as e:
        raise ValueError(f"{e} (layout 'cubemap')") from None
    if cells > 4 * size:
        raise ValueError(f"wrap_cells: {cells} is more than a loop of 4 cube faces ({4 * size} latent cells)")
    faces = latent.split(size, dim=-1)
    out, px = None, None
    for ring in RINGS.values():
        strip = ring_strip(faces, ring)
        images = decode(vae, wrap_pad(strip, cells)).movedim(-1, 1)  # (B, C, H, W) to turn like latents
        px = images.shape[-2] // size
        decoded = images[..., cells * px:(cells + 4 * size) * px].split(size * px, dim=-1)
        if out is None:
            out = [images.new_zeros(images.shape[:2] + (size * px, size * px)) for _ in range(6)]
            across = crossing_weight(size * px, images.dtype, images.device)
        for (f, k), image in zip(ring, decoded):
            out[f] += torch.rot90(image * across, -k, dims=(-2, -1))
    return torch.cat(out, dim=-1).movedim(1, -1)

