"""ComfyUI's MultiGPU work units (MultiGPU CFG Split, core since 0.23): the denoising pass's window batches spread
over the devices' model clones through core's thread pool.

With extra devices, ComfyUI's sampling puts `multigpu_clones` (device -> ModelPatcher clone), `multigpu_options`
(relative speeds) and a `multigpu_thread_pool` (one worker per device) into the model options and splits each
model evaluation's conds over the devices (comfy/samplers.py `_calc_cond_batch_multigpu`). Under ControlSync the
evaluation's work is the windows: each device gets a run of window batches in proportion to its speed
(comfy.multigpu.load_balance_devices), and each batch is evaluated by the rest of ComfyUI's cond batching on that
device's model clone, with the device's ControlNet instances (conds.py). Passes that build a gradient graph or
evaluate chosen windows (region passes) stay on the main device. With one device ComfyUI sets none of this and
the pack runs as before.
"""
from __future__ import annotations

import torch

import comfy.model_management


def device_models(model_options) -> dict | None:
    """{device: BaseModel} of a run spread over several devices, main device first; None on one device."""
    clones = model_options.get("multigpu_clones")
    if not clones or len(clones) < 2:
        return None
    return {device: patcher.model for device, patcher in clones.items()}


def main_device_options(model_options) -> dict:
    """The options of a call ComfyUI must run on the main device only (its multi-GPU path runs without grad)."""
    if "multigpu_clones" not in model_options:
        return model_options
    return {k: v for k, v in model_options.items() if k not in ("multigpu_clones", "multigpu_thread_pool")}


def assign(batches, model_options) -> dict:
    """{device: [batch, ...]}: consecutive runs of batches, as many per device as its relative speed asks."""
    import comfy.multigpu  # only where ComfyUI has MultiGPU (it made the clones): not in 0.3.64
    work = comfy.multigpu.load_balance_devices(model_options, len(batches)).work_per_device
    out, start = {}, 0
    for device, count in work.items():
        out[device] = batches[start:start + count]
        start += count
    return out


def device_options(model_options, device) -> dict:
    """A device's call options: single-device cond batching on its model clone, the schedule on its device."""
    options = main_device_options(model_options)
    transformer_options = dict(options.get("transformer_options") or {})
    if torch.is_tensor(transformer_options.get("sample_sigmas")):
        transformer_options["sample_sigmas"] = transformer_options["sample_sigmas"].to(device)
    return {**options, "transformer_options": transformer_options}


def run_on_devices(jobs, model_options, output_device) -> dict:
    """jobs: {device: [(key, call), ...]} where call(device) evaluates on that device; every device's calls run in
    its worker of ComfyUI's thread pool (in order; without a pool, one device after the other here). Returns
    {key: outputs on `output_device`}; a worker's error (Cancel included) is raised here."""
    def work(device, calls):
        with torch.no_grad():  # as ComfyUI's own multi-GPU batches run
            out = []
            for key, call in calls:
                comfy.model_management.throw_exception_if_processing_interrupted()
                out.append((key, [o.to(output_device) for o in call(device)]))
            return out
    pool = model_options.get("multigpu_thread_pool")
    results, errors = {}, []
    if pool is None:
        for device, calls in jobs.items():
            results.update(work(device, calls))
        return results
    submitted = [device for device, calls in jobs.items() if calls]
    for device in submitted:
        pool.submit(device, work, device, jobs[device])
    for device in submitted:  # collect every worker before raising, so none is left running
        result, error = pool.get_result(device)
        if error is not None:
            errors.append(error)
        else:
            results.update(result)
    if errors:
        raise errors[0]
    if output_device.type == "cuda":
        torch.cuda.synchronize(output_device)  # the workers' copies to the main device are asynchronous
    return results
