"""How many windows go into one model call or one gradient graph, and what to do when that runs out of memory."""
from __future__ import annotations

import logging
import math

import comfy.model_management

from .model_facts import latent_geometry

# activations kept for backward, against ComfyUI's inference estimate of one window's model call
GRADIENT_MEMORY_FACTOR = 3.0
# an SD-sized decoder + LPIPS-VGG, forward and backward in float32, bytes per decoded pixel (measured on the
# CPU, 2026-12-01: tests/benchmark_sync.py --measure-loss-memory gives 28149; half-precision decoders need less)
LOSS_BYTES_PER_PIXEL = 28_000


def auto_window_batch(model, plan, conds, latent_shape, free_memory: float, gradient: bool = False,
                      loss_bytes_per_pixel: float | None = None, copies_saved: bool = False,
                      cast_weights: float = 0.0) -> int:
    """Windows per model call for `free_memory` bytes: as many as fit with ComfyUI's own 1.5x margin, from
    ComfyUI's own estimate of one window's model call (twice that with ControlNets). A gradient pass keeps
    its activations for backward (twice again where each saved activation is copied: DiTs, see autograd.py)
    and adds the loss's decoder and LPIPS per decoded pixel; `cast_weights`: bytes of weights a partly loaded
    (lowvram) or streamed (dynamic VRAM) model casts per layer, which backward keeps copies of - once per graph,
    not per window."""
    per_window = window_bytes(model, plan, conds, latent_shape, gradient, loss_bytes_per_pixel, copies_saved)
    if gradient:
        free_memory = free_memory - 1.5 * cast_weights
    return max(1, math.floor(free_memory / (1.5 * per_window)))


def window_bytes(model, plan, conds, latent_shape, gradient: bool = False, loss_bytes_per_pixel: float | None = None,
                 copies_saved: bool = False) -> float:
    """The estimated bytes one more window adds to a model call, or to a gradient graph (`gradient`)."""
    h, w = max(r.size for r in plan.regions)
    n_conds = sum(c is not None for c in conds)
    shape = [latent_shape[0] * max(n_conds, 1), latent_shape[1], h, w]
    per_window = model.memory_required(shape)
    if any(c is not None and any(d.get("control") is not None for d in c) for c in conds):
        per_window *= 2
    if gradient:
        factor = latent_geometry(model)[0]
        activations = GRADIENT_MEMORY_FACTOR * (2 if copies_saved else 1)
        loss = LOSS_BYTES_PER_PIXEL if loss_bytes_per_pixel is None else loss_bytes_per_pixel
        per_window = per_window * activations + loss * latent_shape[0] * h * w * factor ** 2
    return per_window


def automatic_batch(model, plan, conds, x_in, gradient=False, loss_bytes_per_pixel=None) -> int:
    """One window per call on the CPU (larger batches bring no parallelism there and measured slower:
    tests/benchmark_windows.py); on a GPU as many as its free memory holds now (read once per run, for
    gradient graphs after the loss's decoder and LPIPS are loaded)."""
    if x_in.device.type == "cpu":
        return 1
    from .autograd import adds_in_place
    patcher = getattr(model, "current_patcher", None)
    cast = 0.0
    if patcher is not None and gradient:
        cast = streamed_weight_bytes(patcher)
    # ComfyUI's own cond batching asks the patcher: under dynamic VRAM it counts the weights it may evict
    free = patcher.get_free_memory(x_in.device) if patcher is not None else comfy.model_management.get_free_memory(x_in.device)
    return auto_window_batch(model, plan, conds, x_in.shape, free, gradient, loss_bytes_per_pixel,
                             gradient and adds_in_place(model), cast)


def streamed_weight_bytes(patcher) -> float:
    """Bytes of weights a gradient graph keeps copies of (autograd.py's _is_cast_view): under dynamic VRAM
    (comfy-aimdo, ComfyUI 0.33's default on GPUs) every streamed layer's weight is a view of a cast buffer or a
    vbar page, so the whole model; otherwise the part a lowvram load left out of VRAM."""
    if getattr(patcher, "is_dynamic", lambda: False)():
        return float(patcher.model_size())
    return max(0.0, float(patcher.model_size() - patcher.loaded_size()))


def is_out_of_memory(error: BaseException) -> bool:
    check = getattr(comfy.model_management, "is_oom", None)
    if check is not None:
        return bool(check(error))
    return isinstance(error, comfy.model_management.OOM_EXCEPTION)


def halving_batches(batches, run_one, on_smaller, what: str, advice: str):
    """run_one(batch) for every batch; a batch that runs out of memory is split in halves and retried
    (`on_smaller(size)` is told the new size, to use it for the rest of the run); a single window that runs out
    of memory raises a ValueError saying `advice`."""
    queue = list(batches)
    while queue:
        batch = queue.pop(0)
        try:
            run_one(batch)
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            comfy.model_management.soft_empty_cache()
            if len(batch) == 1:
                raise ValueError(f"{what}: out of memory with one window per graph. {advice}") from e
            half = (len(batch) + 1) // 2
            logging.warning(f"ControlSync: out of memory with {len(batch)} windows per {what} graph; retrying with {half}")
            on_smaller(half)
            queue[:0] = [batch[:half], batch[half:]]
