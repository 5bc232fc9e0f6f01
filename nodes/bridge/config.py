"""What the nodes hand the bridge: immutable settings, safe to share between model clones (ComfyUI copies
model_options only down through dicts and lists)."""
from __future__ import annotations

from dataclasses import dataclass

from ...sampling.sync import SyncSchedule


@dataclass(frozen=True)
class SyncSettings:
    """What AnchorSync asks for (the SYNC socket type)."""
    schedule: SyncSchedule
    vae: object              # comfy.sd.VAE: the decoder the loss looks through
    loss_net: str = "vgg"    # LPIPS backbone
    through_model: bool = True  # False: the fast mode (no backward pass through the model)
    loss_downscale: int = 1     # 2: the loss looks at x0 decoded at half size (4x cheaper decoder and LPIPS)
    loss_decoder: str = "vae"   # "taesd": ComfyUI's tiny differentiable decoder (models/vae_approx) instead


GUIDE_METHODS = ("replacement", "reconstruction")
GUIDE_SPACES = ("latent", "pixels")


@dataclass(frozen=True, eq=False)
class GuideSettings:
    """What the Low-pass Guide asks for (the CONTROLSYNC_GUIDE socket): the result's low-pass, H(result), kept at
    the image y (nodes/bridge/observations.py)."""
    image: object            # y: ComfyUI IMAGE (B, h, w, C) in [0, 1], any size up to the canvas
    vae: object              # comfy.sd.VAE: encodes y (latent space) or decodes the result (pixels)
    method: str = "replacement"   # or "reconstruction"
    space: str = "latent"         # or "pixels": H after the decoder
    weight: float = 1.0           # Reconstruction's w


@dataclass(frozen=True)
class WindowedConfig:
    plan: object          # anything with .layout(latent_hw, factor, multiple) -> RegionPlan
    window_batch: int     # windows per model call; 0 = as many as memory allows
    sync: SyncSettings | None = None
    focus: tuple | None = None   # (canvas latent shape, region index): sample only that region's latent
    schedule_position: tuple | None = None  # (offset, total): the run is steps offset.. of a total-step schedule
    guide: GuideSettings | None = None      # the Low-pass Guide's low-resolution image

    @property
    def reconstruction(self) -> float | None:
        """The Reconstruction weight when the plan keeps known pixels that way, else None (Replacement:
        ComfyUI's noise mask)."""
        if getattr(self.plan, "known_pixels", "replacement") != "reconstruction":
            return None
        return float(self.plan.reconstruction_weight)
