"""The CALC_COND_BATCH wrapper: one call of ComfyUI's cond batching for the canvas becomes batches of regions,
each with its cropped latents and conds, merged back with the plan's rule.

One model evaluation of the sampler runs, for the canvas:
  - AnchorSync, at a synced step's first evaluation (sync.py): the factors' gradient passes toward the
    anchor, through the guider's own math (`guided_x0`: the guider is called on a batch of windows and this
    wrapper, seeing a focus, evaluates just those windows); the merged move is handed to the sampler's x;
  - the batched denoising pass over every region, at its moved latent (`denoise_regions`);
  - the merge (`merge_outputs`);
  - the conditioning observations' corrections: known pixels kept by Reconstruction, the Low-pass Guide
    (observations.py).
Nested calls within the same evaluation (guidance that calls the model again from a post-CFG function,
like PAG) are evaluated at the same moved latents; they never sync again.
"""
from __future__ import annotations

import functools

import torch

import comfy.model_management

from ...sampling import MergeRule
from .conds import stack_regions
from .devices import assign, device_models, device_options, main_device_options, run_on_devices
from .model_facts import refuse_unsupported
from .positions import offset
from .run import Focus, Key, RunContext, RunState, current_focus, current_run, focused_layout


def calc_cond_batch(config, executor, model, conds, x_in, timestep, model_options, *args, **kwargs):
    refuse_unsupported(model_options)
    run = current_run.get()
    transient = run is None or run.ctx.config is not config
    if transient:  # called outside our OUTER_SAMPLE (another guider's path): state for this call only
        layout = focused_layout(config, model, x_in.shape)
        run = RunState(RunContext(config, layout, MergeRule(layout), model))
    call = functools.partial(executor, *args, **kwargs) if (args or kwargs) else executor
    try:
        focus = current_focus.get()
        if focus is not None and focus.run is run:
            return region_pass(run, focus, call, model, conds, x_in, timestep, model_options)
        return canvas_pass(run, call, model, conds, x_in, timestep, model_options)
    finally:
        if transient:
            run.close()


def region_pass(run, focus, executor, model, conds, x, timestep, model_options):
    """Evaluate only the focused regions (stacked along dim 0), or hand back outputs the evaluation
    already recorded for them."""
    records = run.current_evaluation().outputs.setdefault(Key("regions", model_options, *conds), {})
    if focus.reuse and all(i in records for i in focus.regions):
        return [torch.cat([records[i][ci] for i in focus.regions]) for ci in range(len(conds))]
    B = x.shape[0] // len(focus.regions)
    outs = executor(model, run.crop_conds(conds, focus.regions, B), x, timestep,
                    main_device_options(run.crop_options(model_options, focus.regions, B)))
    if focus.record:
        for i, parts in zip(focus.regions, zip(*[o.chunk(len(focus.regions)) for o in outs])):
            records[i] = list(parts)
    return outs


def canvas_pass(run, executor, model, conds, x_in, timestep, model_options):
    """One call of the sampler's model evaluation for the whole latent: sync (at a synced step's first
    call), the denoising pass, the merge, the observations' corrections."""
    from .observations import correction
    from .sync import sync_moves
    if not run.tracked and run.depth == 0:
        run.evaluations += 1
    ev = run.current_evaluation()
    ev.calls += 1
    key = Key("canvas", model_options, *conds)
    if key in ev.outputs:  # the guider's math replayed on outputs this evaluation already merged
        return ev.outputs[key]
    run.depth += 1
    try:
        if run.ctx.config.focus is not None:  # the latent is the one region: no merge, no sync
            merged = region_pass(run, Focus(run, (0,)), executor, model, conds, x_in, timestep, model_options)
        else:
            if run.ctx.synced and not run.tracked:
                raise ValueError("sync: this sampler runs its own loop instead of its sampler function, so "
                                 "AnchorSync cannot see its steps or move its latent; use one of ComfyUI's "
                                 "KSampler samplers or disconnect sync")
            sync = run.sync_step(timestep) if ev.calls == 1 else None
            if sync is not None:
                ev.sync = sync_moves(run, model, conds, x_in, timestep, model_options, sync)
                run.pending_move = ev.sync.canvas
            merged = merge_outputs(run, denoise_regions(run, executor, model, conds, x_in, timestep, model_options,
                                                        ev.sync), x_in)
        ev.outputs[key] = merged
        if run.observations:
            if ev.correction is None and ev.calls == 1:
                ev.correction = correction(run, model, conds, x_in, timestep, model_options, ev.sync)
            if ev.correction is not None:
                merged = [o - ev.correction for o in merged]
        return merged
    finally:
        run.depth -= 1


def denoise_regions(run, executor, model, conds, x_in, timestep, model_options, sync=None):
    """Every region's outputs ({region: [per cond]}): at its moved latent (exact sync mode), or at its latent
    and then shifted (fast mode), in batches of equal-size regions. Zero-coefficient regions add nothing to
    the merge and are skipped; outputs the evaluation recorded at a region's unmoved latent are reused."""
    plan = run.ctx.plan
    records = run.current_evaluation().outputs.get(Key("regions", model_options, *conds), {})
    moves = sync.moves if sync is not None else None
    outputs, todo = {}, []
    for i, c in enumerate(plan.coefficients):
        if c == 0:
            continue
        if i in records and (moves is None or not bool(moves[i].any())):
            outputs[i] = records[i]
        else:
            todo.append(i)
    batches = batches_of(plan, todo, run.denoise_batch_size(model, conds, x_in))
    models = device_models(model_options)
    results = {}
    if models is None:
        for batch in batches:
            comfy.model_management.throw_exception_if_processing_interrupted()
            results[batch] = executor(model, *window_call(run, batch, conds, x_in, timestep, model_options, moves))
    else:  # ComfyUI's MultiGPU work units: runs of batches on each device's model clone (devices.py)
        jobs = {device: [(batch, on_device(executor, models[device],
                                           window_call(run, batch, conds, x_in, timestep, model_options, moves, device)))
                         for batch in runs] for device, runs in assign(batches, model_options).items()}
        results = run_on_devices(jobs, model_options, x_in.device)
    for batch in batches:
        outs = results[batch]
        for ci, out in enumerate(outs):
            for i, part in zip(batch, out.chunk(len(batch))):
                outputs.setdefault(i, [None] * len(outs))[ci] = part
    if sync is not None and sync.shifts is not None:
        outputs = {i: [o - sync.shifts[i].to(o) for o in parts] for i, parts in outputs.items()}
    return outputs


def window_call(run, batch, conds, x_in, timestep, model_options, moves=None, device=None):
    """(conds, x, timestep, model options) of one model call on a batch of regions, at their moved latents; the
    conds with `device`'s ControlNet instances."""
    B = x_in.shape[0]
    x_w = stack_regions(x_in, [run.ctx.plan.regions[i] for i in batch], B)
    if moves is not None:
        x_w = x_w - torch.cat([moves[i] for i in batch]).to(x_w)
    t_w = timestep if len(batch) == 1 else timestep.repeat(len(batch))
    return run.crop_conds(conds, batch, B, device), x_w, t_w, run.crop_options(model_options, batch, B)


def on_device(executor, model, call):
    conds, x, t, options = call
    return lambda device: executor(model, conds, x.to(device), t.to(device), device_options(options, device))


def merge_outputs(run, outputs, x_in) -> list:
    """The canvas prediction of every cond."""
    n_conds = len(next(iter(outputs.values())))
    like = next(iter(outputs.values()))[0]
    merged = []
    for ci in range(n_conds):
        merger = run.ctx.merge.merger(like[:x_in.shape[0]].new_zeros(x_in.shape))
        for i, parts in outputs.items():
            merger.add(i, parts[ci])
        merged.append(merger.result())
    return merged


def batches_of(plan, indices, size):
    """Runs of region indices to evaluate in one call; only regions of one size batch together (factor
    graphs mix factor and variable sizes), per-region prompts of one token count (CLIP pads, T5 and
    Qwen cannot), and with canvas-global positions regions at one offset (positions.py)."""
    by_size = {}
    for i in indices:
        key = (plan.regions[i].size, plan.prompts[i].shape[-2] if plan.prompts else None, offset(plan, i))
        by_size.setdefault(key, []).append(i)
    size = max(1, size)
    return [tuple(ids[s:s + size]) for ids in by_size.values() for s in range(0, len(ids), size)]


def guided_x0(run, regions, x, timestep, model_options, record=False, reuse=True):
    """The guider's x0-prediction for a batch of regions stacked along dim 0: the guider's own math
    (CFG, DualCFG, PerpNeg, post-CFG functions, ...), with this wrapper evaluating just those regions.
    Differentiable in x when grad is enabled. `reuse`: hand back the outputs recorded for these regions
    (their unmoved latents) instead of evaluating x."""
    token = current_focus.set(Focus(run, tuple(regions), record, reuse))
    try:
        t = timestep if len(regions) == 1 else timestep.repeat(len(regions))
        if torch.is_grad_enabled() and t.is_inference():
            t = t.clone()  # guidance may compute with sigma and x (RescaleCFG): autograd cannot save inference tensors
        return run.ctx.guider(x, t, model_options=model_options, seed=run.ctx.seed)
    finally:
        current_focus.reset(token)
