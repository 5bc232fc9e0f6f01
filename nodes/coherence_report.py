"""CoherenceReport: did the settings help? Drift per window, seams and edge adherence, as a chart and text."""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.utils
from comfy_api.latest import io, ui

from ..sampling import gather, metrics
from ..sampling.preview import ANCHOR_COLOR
from . import bridge
from .schema import WindowPlanType, schema
from .window_planner import LATENT_CELL_PX

CHART_HEIGHT, BAR_WIDTH, GAP = 240, 24, 6
BAR_COLOR = torch.tensor([0.2, 0.6, 0.95])


def drift_chart(drift: list[float], anchor: int, seam: float, edge: float | None) -> torch.Tensor:
    """(H, W, 3) bars: one per window (LPIPS to the anchor, scale 0..1, anchor pink), then the seam score
    (scale 0..4, a line at 1 = invisible) and the edge F1 (0..1), on white with a grey grid every 0.25."""
    bars = [(min(v, 1.0), ANCHOR_COLOR if i == anchor else BAR_COLOR) for i, v in enumerate(drift)]
    bars.append((None, None))  # spacer
    bars.append((min(seam / 4.0, 1.0), torch.tensor([0.95, 0.55, 0.1])))
    if edge is not None:
        bars.append((edge, torch.tensor([0.3, 0.8, 0.35])))
    width = GAP + len(bars) * (BAR_WIDTH + GAP)
    chart = torch.ones(CHART_HEIGHT, width, 3)
    for level in (0.25, 0.5, 0.75):
        chart[round(CHART_HEIGHT * (1 - level))] = 0.85
    for k, (value, color) in enumerate(bars):
        if value is None:
            continue
        x0 = GAP + k * (BAR_WIDTH + GAP)
        top = min(round(CHART_HEIGHT * (1 - value)), CHART_HEIGHT - 4)  # the anchor's zero still shows
        chart[top:, x0:x0 + BAR_WIDTH] = color
    seam_x = GAP + len(drift) * (BAR_WIDTH + GAP) + (BAR_WIDTH + GAP)
    chart[round(CHART_HEIGHT * 0.75), seam_x - 2:seam_x + BAR_WIDTH + 2] = 0.0  # seam score 1.0
    return chart


class CoherenceReport(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="ControlSyncCoherenceReport",
            display_name="Coherence Report (ControlSync)",
            search_aliases=("SyncDiffusion", "panorama", "LPIPS", "seam", "metrics"),
            category="sampling/controlsync",
            is_output_node=True,  # its preview shows on the node, also when queued on its own
            description="Measures how coherent a large image is: each window's LPIPS to the anchor window (drift), "
                        "intra-LPIPS over non-overlapping crops (SyncDiffusion's metric), the seam score across the "
                        "wrap (1.0 = as invisible as any interior column) and, with a condition image, the edge F1. "
                        "Returns a chart and the numbers as text, one row per image of the batch.",
            inputs=[
                io.Image.Input("image", tooltip="The decoded image (or a batch of them) to measure."),
                io.Int.Input("crop", default=512, min=16, max=16384, step=8,
                             tooltip="Crop size for intra-LPIPS (SyncDiffusion: 512). Must fit in the image."),
                io.Combo.Input("lpips_net", options=["vgg", "alex"], default="vgg",
                               tooltip="LPIPS backbone (vgg as in SyncDiffusion's evaluation; alex is faster). Needs the "
                                       "backbone file in models/lpips/, as for Anchor Sync."),
                WindowPlanType.Input("plan", optional=True,
                                     tooltip="The plan the image was made with: its windows give the drift profile and "
                                             "its window edges a boundary seam score. Without it: windows of `crop` px."),
                io.Image.Input("condition", optional=True,
                               tooltip="The condition image (edge map, ...) for the edge F1 of the output's edges."),
            ],
            outputs=[io.Image.Output(display_name="chart", tooltip="Bars: drift per window (anchor pink), seam score "
                                                                   "(orange, black line = 1.0), edge F1 (green)."),
                     io.String.Output(display_name="report", tooltip="The numbers, one row per image.")],
        )

    @classmethod
    def execute(cls, image, crop, lpips_net, plan=None, condition=None) -> io.NodeOutput:
        if image.ndim != 4 or image.shape[-1] != 3:
            raise ValueError(f"image: expected RGB images (batch, height, width, 3), got shape {tuple(image.shape)}")
        H, W = image.shape[1:3]
        if min(H, W) < crop:
            raise ValueError(f"crop: the image is {W}x{H} px, smaller than one crop of {crop} px; lower crop")
        device = comfy.model_management.get_torch_device()  # where ComfyUI runs its models
        try:
            bridge.lpips_backbone_path(lpips_net)  # reported even when a model is cached from an earlier run
            loss = bridge.load_lpips(lpips_net, device)
        except FileNotFoundError as e:
            raise ValueError(f"lpips_net: {e}") from None
        if plan is not None:
            layout = plan.layout((H // LATENT_CELL_PX, W // LATENT_CELL_PX), LATENT_CELL_PX)
            # the windows or factors, not their overlaps; the anchor's place among them
            factors = [i for i in range(len(layout.regions)) if not layout.factors_of or layout.factors_of[i] == (i,)]
            regions = [layout.regions[i].scaled(LATENT_CELL_PX) for i in factors]
            anchor = factors.index(layout.anchor)
            edges = sorted({p.src[1] for r in regions for p in r.pieces if 0 < p.src[1] < W})
        else:
            from ..sampling.plans import rect_region, window_starts
            regions = [rect_region(0, x, H, crop) for x in window_starts(W, crop, crop)]
            anchor, edges = 0, []
        # one progress step per LPIPS call: every window's drift, then the crop pairs, per image
        bar = comfy.utils.ProgressBar(image.shape[0] * (len(regions) + 1))

        def distance(a, b):
            comfy.model_management.throw_exception_if_processing_interrupted()
            out = loss(a.to(device), b.to(device), normalize=False).flatten().cpu()
            bar.update(1)
            return out

        charts, rows = [], []
        with torch.no_grad():
            for b in range(image.shape[0]):
                img = image[b].movedim(-1, 0).float() * 2 - 1
                drift = metrics.drift_profile([gather(img, r) for r in regions], anchor, distance)
                intra = metrics.intra_lpips(img, distance, crop) if len(metrics.crops(img, crop)) > 1 else None
                seam = metrics.seam_score(img)
                boundary = metrics.seam_score(img, edges) if edges else None
                edge = None
                if condition is not None:
                    cond = condition[min(b, condition.shape[0] - 1)].movedim(-1, 0).float() * 2 - 1
                    if cond.shape[-2:] != img.shape[-2:]:
                        raise ValueError(f"condition: {cond.shape[-1]}x{cond.shape[-2]} px, but the image is {W}x{H}")
                    edge = metrics.edge_f1(metrics.sobel_edges(img), metrics.sobel_edges(cond))
                charts.append(drift_chart(drift, anchor, seam, edge))
                rows.append(f"image {b}: intra-LPIPS {'-' if intra is None else f'{intra:.4f}'} | drift mean "
                            f"{sum(drift) / max(len(drift) - 1, 1):.4f} max {max(drift):.4f} | seam (wrap) {seam:.2f}"
                            + (f" | seam (window edges) {boundary:.2f}" if boundary is not None else "")
                            + (f" | edge F1 {edge:.3f}" if edge is not None else "")
                            + " | drift per window " + " ".join(f"{v:.3f}" for v in drift))
        charts, text = torch.stack(charts), "\n".join(rows)
        # shown on the node itself: the chart as a preview image, the numbers as text (web/report_text.js)
        shown = {**ui.PreviewImage(charts, cls=cls).as_dict(), **ui.PreviewText(text).as_dict()}
        return io.NodeOutput(charts, text, ui=shown)
