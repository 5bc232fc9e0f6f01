"""ControlSync's ComfyUI nodes: one file per node, plus bridge/, the one package that talks to ComfyUI internals."""
from .anchor_sync import AnchorSync
from .coherence_report import CoherenceReport
from .controlsync_sampler import ControlSyncSampler
from .cubemap_layout import CubemapLayout
from .cubemap_to_equirect import CubemapToEquirect
from .equirect_to_cubemap import EquirectToCubemap
from .factor_graph_collage import FactorGraphCollage
from .loop_decode import LoopDecode
from .lowpass_guide import ControlSyncLowPass
from .window_planner import WindowPlanner
from .windowed_model import ControlSyncWindowedModel

NODES = [WindowPlanner, ControlSyncSampler, AnchorSync, FactorGraphCollage, LoopDecode, CubemapToEquirect, EquirectToCubemap,
         CubemapLayout, CoherenceReport, ControlSyncWindowedModel, ControlSyncLowPass]
