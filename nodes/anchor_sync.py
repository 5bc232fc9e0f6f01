"""AnchorSync: the SyncDiffusion / ControlSync step - windows pulled toward the anchor window's look."""
from __future__ import annotations

from comfy_api.latest import io

from ..sampling.sync import LOSS_NETS, SYNC_STARTS, SyncSchedule
from . import bridge
from .schema import SyncType, schema


class AnchorSync(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="AnchorSync",
            display_name="Anchor Sync (SyncDiffusion)",
            search_aliases=("SyncDiffusion", "panorama", "coherent", "LPIPS", "style consistency"),
            category="sampling/controlsync",
            description="SyncDiffusion / ControlSync synchronisation for ControlSync Sampler: in the first steps, "
                        "every window takes one gradient step that lowers the LPIPS distance between its decoded "
                        "x0-prediction and the anchor window's, so distant windows agree on style and lighting while "
                        "each still follows its own crop of the ControlNet condition. The anchor is set in Window Planner.",
            inputs=[
                io.Vae.Input("vae", tooltip="The VAE whose decoder the perceptual loss looks through (the checkpoint's VAE)."),
                io.Float.Input("weight", default=20.0, min=0.0, max=1000.0, step=0.5,
                               tooltip="Gradient step size w (papers: 20). Higher pulls windows harder toward the anchor's "
                                       "look; 0 turns sync off. Scaled to the model's own sampling space (eps, v-prediction "
                                       "or flow, read from the model) so 20 means the paper's 20."),
                io.Float.Input("decay", default=0.95, min=0.0, max=1.0, step=0.01,
                               tooltip="w_t = weight * decay^t (papers: 0.95): later synced steps pull less."),
                io.Int.Input("sync_steps", default=10, min=0, max=1000,
                             tooltip="Synced steps, counted on a 50-step schedule (papers: 10 of 50, the first 20%). "
                                     "At N steps, round(sync_steps*N/50) steps are synced (same part of the noise "
                                     "schedule) and decay applies per 50-step-equivalent."),
                io.Combo.Input("lpips_net", options=list(LOSS_NETS), default="vgg",
                               tooltip="LPIPS backbone: vgg as in SyncDiffusion (exact), alex is several times faster. "
                                       "Needs vgg16-397923af.pth / alexnet-owt-7be5be79.pth in models/lpips/."),
                io.Combo.Input("gradient", options=["exact", "skip model Jacobian"], default="exact",
                               tooltip="exact: the gradient flows through CFG, ControlNets, UNet and VAE decoder (the "
                                       "paper). 'skip model Jacobian': no backward pass through the model - the "
                                       "gradient stops at its prediction and the model's slope along it comes from one "
                                       "more forward evaluation: faster, less memory, approximate."),
                io.Combo.Input("loss_resolution", options=["full", "half"], default="full", optional=True,
                               tooltip="full: the loss decodes each window at full size (the paper). half: x0 is "
                                       "average-pooled 2x before decoding - about 4x less decoder and LPIPS time and "
                                       "memory per window, coarser guidance."),
                io.Combo.Input("loss_decoder", options=["vae", "taesd"], default="vae", optional=True,
                               tooltip="vae: the loss looks through the full VAE decoder (the paper). taesd: through "
                                       "ComfyUI's tiny TAESD decoder (models/vae_approx/taesd_decoder.*, the preview "
                                       "decoder) - much faster and lighter, approximate."),
                io.Combo.Input("count_from", options=list(SYNC_STARTS), default="schedule", optional=True,
                               tooltip="schedule: sync_steps counts from the start of the whole noise schedule (the "
                                       "papers). A sampler at denoise below 1 skips that start, so img2img at denoise "
                                       "0.5 syncs nothing. run: counts from the first step that runs - img2img and "
                                       "upscaling at denoise 0.5 and 20 steps sync the first 4 of those 20, where the "
                                       "run still changes colour and lighting."),
            ],
            outputs=[SyncType.Output(display_name="sync", tooltip="Connect to ControlSync Sampler's sync input.")],
        )

    @classmethod
    def execute(cls, vae, weight, decay, sync_steps, lpips_net, gradient, loss_resolution="full",
                loss_decoder="vae", count_from="schedule") -> io.NodeOutput:
        if vae is None or getattr(vae, "first_stage_model", None) is None:
            raise ValueError("vae: AnchorSync needs a VAE with a decoder (the checkpoint's VAE); none was given")
        try:
            bridge.lpips_backbone_path(lpips_net)
        except FileNotFoundError as e:
            raise ValueError(f"lpips_net: {e}") from None
        schedule = SyncSchedule(weight=weight, decay=decay, steps=sync_steps, start=count_from)
        return io.NodeOutput(bridge.SyncSettings(schedule, vae, lpips_net, gradient == "exact",
                                                 2 if loss_resolution == "half" else 1, loss_decoder))
