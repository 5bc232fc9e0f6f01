"""Everything that talks to ComfyUI internals, one module per concern:

  model_facts     what the pack reads off a MODEL (latent geometry, sampling space) and what it refuses
  config          the immutable settings the nodes hand over (SyncSettings, WindowedConfig)
  windowed        the clone with its OUTER_SAMPLE wrapper: one run set up per sampling call
  run             a run's context and state, one model evaluation's shared records
  steps           step tracking: evaluations counted, each step's first found, the sync's move applied to x
  passes          the CALC_COND_BATCH wrapper: regions cropped, denoised in batches, merged
  conds           conds cut to windows: masks, areas, prompts, ControlNet copies with hint crops
  model_patches   ControlNets on the MODEL (0.33's model patches) cut to windows: per-batch copies, crops encoded
  positions       canvas-global positions: rope_options shifted per window call
  devices         MultiGPU work units: window batches over the devices' model clones in core's thread pool
  memory          windows per model call and per gradient graph; out of memory halves and retries
  autograd        gradients inside ComfyUI's inference mode, weights aliased, never copied
  sync            AnchorSync's gradient passes toward the anchor
  observations    conditioning observations y = H(result): known pixels by Reconstruction, the Low-pass Guide
  loss_models     the perceptual loss's decoder and LPIPS, from ComfyUI's folders
  autoregressive  the autoregressive baseline, window after window

Data flows node -> plan -> bridge -> sampling/ (plain torch) and back; sampling/ never imports ComfyUI.
"""
from .autograd import differentiable
from .autoregressive import sample_autoregressive
from .conds import check_hint_aspect
from .config import GUIDE_METHODS, GUIDE_SPACES, GuideSettings, SyncSettings, WindowedConfig
from .loss_models import load_lpips, load_taesd, lpips_backbone_path
from .memory import auto_window_batch
from .observations import check_guide, check_guide_order
from .model_facts import latent_geometry, layout_for, parameterisation, refuse_unsupported
from .windowed import WRAPPER_KEY, windowed_model

__all__ = ["differentiable", "sample_autoregressive", "check_hint_aspect", "GUIDE_METHODS", "GUIDE_SPACES",
           "GuideSettings", "SyncSettings", "WindowedConfig", "check_guide", "check_guide_order",
           "load_lpips", "load_taesd", "lpips_backbone_path", "auto_window_batch", "latent_geometry", "layout_for",
           "parameterisation", "refuse_unsupported", "WRAPPER_KEY", "windowed_model"]
