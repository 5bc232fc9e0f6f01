"""Autograd inside ComfyUI's inference mode, for the gradient passes (AnchorSync, Reconstruction)."""
from __future__ import annotations

import contextlib
import copy

import torch

import comfy.ldm.modules.diffusionmodules.openaimodel
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension

# ComfyUI's torch.compile wrapper key (comfy_api/torch_helpers/torch_compile.py)
_COMPILE_KEY = "torch.compile"


def gradient_options(model_options):
    """Options for a pass that autograd runs through. ControlNet residuals are added in place (h += ctrl) to
    skip tensors the next block saved for backward: a copy after the skip connection keeps the saved tensor
    intact. torch.compile's wrapper is left out: a graph compiled for inference would recompile for the
    gradient pass, and fall back to eager mode for the whole run once recompiles run out."""
    options = comfy.model_patcher.create_model_options_clone(model_options)
    transformer_options = options.setdefault("transformer_options", {})
    patches = transformer_options.setdefault("patches", {})
    patches["input_block_patch_after_skip"] = list(patches.get("input_block_patch_after_skip", [])) + [_copy_after_skip]
    wrappers = transformer_options.get("wrappers", {})
    apply_model = wrappers.get(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {})
    if _COMPILE_KEY in apply_model:
        transformer_options["wrappers"] = {**wrappers, comfy.patcher_extension.WrappersMP.APPLY_MODEL:
                                           {k: v for k, v in apply_model.items() if k != _COMPILE_KEY}}
    return options


def _copy_after_skip(h, transformer_options):
    return h.clone()


def control_modules(conds):
    modules, seen = [], set()
    for cond_list in conds:
        for d in cond_list or ():
            node = d.get("control")
            while node is not None:
                for name in ("control_model", "t2i_model"):
                    m = getattr(node, name, None)
                    if isinstance(m, torch.nn.Module) and id(m) not in seen:
                        seen.add(id(m))
                        modules.append(m)
                node = node.previous_controlnet
    return modules


@contextlib.contextmanager
def differentiable(modules, copy_saved: bool = False):
    """Autograd inside ComfyUI's inference mode. Weights loaded there are inference tensors, which
    autograd cannot save for backward; while the gradient pass runs, each is replaced by a plain tensor
    aliasing the same memory (no copy), and the user's own tensors are put back afterwards, whatever
    happens. Nothing is swapped outside this block, so ComfyUI may move or patch weights between steps.
    `copy_saved`: keep a copy of every activation autograd saves (see _saved_copy); a weight saved as a view of
    a buffer is always copied (see _is_cast_view).
    ComfyUI 0.33 runs RoPE (Flux, Qwen-Image, Lumina / Z-Image, ...) and int8 linears through comfy-kitchen
    kernels that have no backward unless `comfy.model_management.in_training` is set, as its own training node
    sets it: set while the gradient pass runs, restored afterwards."""
    swapped, seen = [], set()
    hooks = torch.autograd.graph.saved_tensors_hooks(_saved_copy if copy_saved else _saved_cast_copy, _saved_value)
    training = getattr(comfy.model_management, "in_training", None)
    with torch.inference_mode(False), torch.enable_grad(), hooks:
        try:
            if training is not None:
                comfy.model_management.in_training = True
            for module in modules:
                for sub in module.modules():
                    if id(sub) in seen:
                        continue
                    seen.add(id(sub))
                    for store in (sub._parameters, sub._buffers):
                        for name, t in list(store.items()):
                            if t is not None and t.is_inference():
                                alias = _alias(t)
                                store[name] = torch.nn.Parameter(alias, requires_grad=False) if isinstance(t, torch.nn.Parameter) else alias
                                swapped.append((store, name, t))
            yield
        finally:
            if training is not None:
                comfy.model_management.in_training = training
            for store, name, t in reversed(swapped):
                store[name] = t


def _saved_copy(t):
    """Model code written for inference adds in place to activations that autograd saved for backward (Flux's
    single-stream blocks, the ControlNet residuals of Flux, SD3 and Qwen-Image): a copy of each saved activation
    keeps the value the backward pass needs. Weights and constants (no grad) are kept as they are, but for
    weights cast into a reused buffer (_saved_cast_copy)."""
    return t.clone() if t.requires_grad else _saved_cast_copy(t)


def _saved_cast_copy(t):
    return t.clone() if not t.requires_grad and _is_cast_view(t) else t


def _is_cast_view(t) -> bool:
    """Whether `t` views another tensor's memory. A layer's weight is one when ComfyUI casts it for the call into
    a buffer the next layers' casts overwrite: dynamic VRAM's cast buffers and vbar pages (comfy/ops.py
    cast_modules_with_vbar: views of raw allocations) and lowvram's per-stream cast buffers (get_cast_buffer).
    Autograd would run backward on whatever the buffer holds then. Parameters, aliased or not, are no views; a
    quantized weight (comfy-kitchen's QuantizedTensor) is one when its inner data is."""
    if hasattr(type(t), "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return any(getattr(t, n)._base is not None for n in names)
    return t._base is not None


def _saved_value(t):
    return t


def adds_in_place(model) -> bool:
    """Whether the diffusion model's code may add in place to saved activations. ComfyUI's UNet does so
    only with ControlNet residuals, which the gradient options' copy after the skip connection handles
    without copying every saved activation (half the activation memory)."""
    return not isinstance(model.diffusion_model, comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel)


def autograd_copy(obj):
    """A shallow copy of `obj` whose tensor attributes made in inference mode are plain tensors autograd can
    save (Wan's latent format, used by Qwen-Image, keeps its per-channel mean and std as tensors). Call it
    outside inference mode."""
    out = copy.copy(obj)
    for name, value in vars(obj).items():
        if torch.is_tensor(value) and value.is_inference():
            setattr(out, name, value.clone())
    return out


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor viewing an inference tensor's memory, of the same class: a wrapper subclass without
    storage of its own (comfy-kitchen's QuantizedTensor, ComfyUI 0.33's quantized and mixed-precision weights)
    rebuilt around aliases of its inner tensors, a subclass keeping its data in its own storage (ComfyUI-GGUF's
    GGMLTensor) re-classed with its attributes (its quantization type and logical shape)."""
    cls = type(t)
    if cls in (torch.Tensor, torch.nn.Parameter):
        return _storage_alias(t)
    if hasattr(cls, "__tensor_flatten__"):
        names, ctx = t.__tensor_flatten__()
        inner = {n: _alias(getattr(t, n)) if getattr(t, n).is_inference() else getattr(t, n) for n in names}
        return cls.__tensor_unflatten__(inner, ctx, t.size(), t.stride())
    alias = _storage_alias(t).as_subclass(cls)
    alias.__dict__.update(t.__dict__)
    return alias


def _storage_alias(t: torch.Tensor) -> torch.Tensor:
    alias = torch.empty(0, dtype=t.dtype, device=t.device)
    return alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
