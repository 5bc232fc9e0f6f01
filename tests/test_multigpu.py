"""ControlSync under ComfyUI's MultiGPU work units (MultiGPU CFG Split). On a machine with one device the node adds
no clone and the run is bit for bit the run without it. ComfyUI's whole multi-device path - the node's deep clones,
the ControlNets' device instances, core's thread pool - is also run here with a second device simulated on the CPU:
ComfyUI's device enumeration reports `cpu` and `cpu:0` (two dictionary keys, one CPU), so every step of the
dispatch runs, in threads, on separate model clones, and must give the one-device bits. The real two-GPU check is
in tests/gpu_check.py."""
from __future__ import annotations

import pytest
import torch

SECOND = torch.device("cpu", 0)


@pytest.fixture(scope="module")
def g(comfy):
    import comfy.cldm.cldm
    import comfy.model_management
    import comfy_extras.nodes_multigpu as multigpu
    import nodes
    import tiny_models as tm
    from controlsync.nodes.anchor_sync import AnchorSync
    from controlsync.nodes.controlsync_sampler import ControlSyncSampler
    from controlsync.nodes.window_planner import WindowPlanner

    class G:
        pass
    g = G()
    g.mm, g.multigpu, g.tm, g.ControlNet = comfy.model_management, multigpu, tm, comfy.cldm.cldm.ControlNet
    g.Sampler, g.Sync = ControlSyncSampler, AnchorSync
    with torch.inference_mode():
        g.image = tm.condition_image(64, 192)
        g.pos, g.neg = nodes.ControlNetApplyAdvanced().apply_controlnet(tm.text_cond(10), tm.text_cond(11),
                                                                         tm.tiny_controlnet(1), g.image, 0.9, 0.0, 1.0)
    g.plan = WindowPlanner.execute(192, 64, 64, 64, 32, "first", 0, "uniform", image=g.image).args[0]
    return g


def base_model(g):
    model = g.tm.tiny_model(0)
    model.cached_patcher_init = (g.tm.tiny_model, (0,))  # the loader factory MultiGPU deep-clones from
    return model


def sample(g, model, sync=None, steps=3):
    with torch.inference_mode():
        return g.Sampler.execute(model, 5, steps, 7.5, "euler", "normal", g.pos, g.neg,
                                 {"samples": torch.zeros(1, 4, 8, 24)}, g.plan, 1.0, 1, sync).args[0]["samples"]


def split(g, model, gpus=2):
    g.mm.cleanup_models_gc()  # as ComfyUI's prompt worker does between prompts: drop freed models' entries
    g.mm.cleanup_models()
    with torch.inference_mode():
        return g.multigpu.MultiGPUCFGSplitNode.execute(model, gpus).args[0]


@pytest.fixture
def two_devices(g, monkeypatch):
    monkeypatch.setattr(g.mm, "get_all_torch_devices", lambda exclude_current=False: [torch.device("cpu"), SECOND])


def calls_per_device(model):
    """Forward hooks counting each device clone's diffusion-model calls."""
    counts, handles = {}, []
    for patcher in [model] + model.get_additional_models_with_key("multigpu"):
        device = patcher.load_device
        handles.append(patcher.model.diffusion_model.register_forward_hook(
            lambda m, a, o, d=device: counts.__setitem__(d, counts.get(d, 0) + 1)))
    return counts, handles


def test_one_device_equals_the_run_without_the_node_bit_for_bit(g):
    model = base_model(g)
    multi = split(g, model)
    assert multi.get_additional_models_with_key("multigpu") == []  # ComfyUI found no second device
    assert torch.equal(sample(g, multi), sample(g, model))


def test_window_batches_spread_over_two_devices_through_cores_thread_pool(g, two_devices):
    """Each evaluation's 5 windows go 3 to the main device's model and 2 to the clone (ComfyUI's load balance at
    equal speeds), each device's ControlNet instance runs its windows, and the sample equals the one-device bits."""
    model = base_model(g)
    multi = split(g, model)
    assert [m.load_device for m in multi.get_additional_models_with_key("multigpu")] == [SECOND]
    counts, handles = calls_per_device(multi)
    controls = set()
    handles.append(torch.nn.modules.module.register_module_forward_hook(
        lambda m, a, o: controls.add(id(m)) if isinstance(m, g.ControlNet) else None))
    try:
        spread = sample(g, multi)
    finally:
        for h in handles:
            h.remove()
    assert counts == {torch.device("cpu"): 3 * 3, SECOND: 3 * 2}
    assert len(controls) == 2  # the user's ControlNet model and its deep clone for the second device
    assert torch.equal(spread, sample(g, model))


def test_anchor_sync_gradient_passes_stay_on_the_main_device(g, two_devices):
    """ComfyUI runs its multi-device batches without grad: the gradient passes (and the anchor's evaluation) run on
    the main device's model, only the denoising pass is spread; the result equals the one-device run's bits."""
    import lpips_weights
    lpips_weights.use_cached_backbones()
    with torch.inference_mode():
        sync = g.Sync.execute(g.tm.tiny_vae(), 20.0, 0.95, 50, "alex", "exact").args[0]
    model = base_model(g)
    multi = split(g, model)
    counts, handles = calls_per_device(multi)
    try:
        spread = sample(g, multi, sync, steps=2)
    finally:
        for h in handles:
            h.remove()
    assert counts[SECOND] == 2 * 2  # two of the five windows per step's denoising pass, nothing else
    assert torch.equal(spread, sample(g, model, sync, steps=2))


def test_model_patch_controlnets_on_several_devices_are_refused(g, two_devices):
    import comfy_extras.nodes_model_patch as mp
    import tiny_033 as t3
    with torch.inference_mode():
        model = t3.zimage()
        model.cached_patcher_init = (t3.zimage, ())
        patched = mp.ZImageFunControlnet().diffsynth_controlnet(model, t3.zimage_controlnet(), t3.flux_vae(), g.image,
                                                               1.0)[0]
        multi = split(g, patched)
        with pytest.raises(ValueError, match="several GPUs"):
            g.Sampler.execute(multi, 5, 1, 4.0, "euler", "simple", t3.text_cond(10), t3.text_cond(11),
                              {"samples": torch.zeros(1, 16, 8, 24)}, g.plan, 1.0, 1)
