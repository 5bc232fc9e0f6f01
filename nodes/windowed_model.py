"""ControlSyncWindowedModel: the same windowed sampling for SamplerCustomAdvanced and other custom samplers."""
from __future__ import annotations

from comfy_api.latest import io

from . import bridge
from .controlsync_sampler import guide_input, window_batch_input
from .schema import SyncType, WindowPlanType, schema


class ControlSyncWindowedModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ControlSyncWindowedModel",
            display_name="ControlSync Windowed Model (tiled diffusion, custom sampling)",
            search_aliases=("tiled diffusion", "panorama", "MultiDiffusion", "SyncDiffusion", "DiffCollage"),
            category="sampling/controlsync",
            description="Returns a copy of the MODEL that samples over the window plan, for SamplerCustomAdvanced, "
                        "custom guiders and any sampler node: the same code as ControlSync Sampler. The latent must "
                        "match the plan's canvas.",
            inputs=[
                io.Model.Input("model", tooltip="The model; it is cloned, never modified."),
                WindowPlanType.Input("plan", tooltip="Windows from Window Planner (or a factor graph)."),
                window_batch_input(),
                SyncType.Input("sync", optional=True, tooltip="AnchorSync settings; the gradient passes run "
                                                             "through the guider's own math (any guider but "
                                                             "Self-Attention Guidance)."),
                guide_input(),
            ],
            outputs=[io.Model.Output(tooltip="A patched clone: connect it to a guider or sampler node.")],
        )

    @classmethod
    def execute(cls, model, plan, window_batch_size=0, sync=None, guide=None) -> io.NodeOutput:
        bridge.check_guide_order(guide, plan)
        return io.NodeOutput(bridge.windowed_model(model, plan, window_batch_size, sync, guide=guide))
