"""LoopDecode: VAE decode of a horizontal loop with no seam where its right edge meets its left."""
from __future__ import annotations

import torch
from comfy_api.latest import io


def wrap_pad(samples: torch.Tensor, cells: int) -> torch.Tensor:
    """The latent with `cells` columns of its other end on each side (it is periodic along the width)."""
    return torch.cat([samples[..., -cells:], samples, samples[..., :cells]], dim=-1)


class LoopDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlSyncLoopDecode",
            display_name="Loop VAE Decode (ControlSync)",
            category="sampling/controlsync",
            description="Decodes a seamless horizontal loop (a Factor Graph Collage 'cycle', a 360 panorama) so the "
                        "seam stays invisible after decoding: the decoder sees the loop's other end on each side "
                        "(wrap padding) instead of a hard image border, and the padding is cropped away.",
            inputs=[
                io.Latent.Input("samples", tooltip="The loop's latent (periodic along its width)."),
                io.Vae.Input("vae", tooltip="The VAE to decode with."),
                io.Int.Input("wrap_cells", default=8, min=1, max=512,
                             tooltip="Latent columns borrowed from the other end on each side (8 = 64 px for SD): the "
                                     "decoder's view across the seam. More costs a little more decoding."),
            ],
            outputs=[io.Image.Output(tooltip="The decoded loop; its left and right edges continue each other.")],
        )

    @classmethod
    def execute(cls, samples, vae, wrap_cells=8) -> io.NodeOutput:
        latent = samples["samples"]
        if latent.ndim != 4:
            raise ValueError(f"samples: expected an image latent (batch, channels, height, width), got {tuple(latent.shape)}")
        if wrap_cells > latent.shape[-1]:
            raise ValueError(f"wrap_cells: {wrap_cells} is wider than the latent ({latent.shape[-1]} columns)")
        images = vae.decode(wrap_pad(latent, wrap_cells))
        if images.ndim == 5:  # video VAEs return (batch, frames, ...)
            images = images.reshape(-1, *images.shape[-3:])
        px = images.shape[-2] // (latent.shape[-1] + 2 * wrap_cells)
        return io.NodeOutput(images[..., wrap_cells * px: (wrap_cells + latent.shape[-1]) * px, :])
