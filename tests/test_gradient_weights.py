"""The gradient passes (AnchorSync's exact mode, Reconstruction) on the weights ComfyUI 0.33 runs: comfy-kitchen's
quantized weights through 0.33's mixed-precision ops, tensor-subclass weights as ComfyUI-GGUF loads them, and
weights cast into a reused buffer (what dynamic VRAM and lowvram hand a layer) - each differentiated inside
`differentiable` against a float model holding the same (dequantized) values, the user's weights restored."""
from __future__ import annotations

import json

import pytest
import torch

FORMATS = ("float8_e4m3fn", "int8_tensorwise")


@pytest.fixture(scope="module")
def g(comfy):
    import comfy.ops
    import comfy.supported_models
    import tiny_models as tm
    from comfy.quant_ops import QuantizedTensor
    from controlsync.nodes.bridge.autograd import differentiable

    class G:
        pass
    g = G()
    g.tm, g.ops, g.supported, g.Quantized, g.differentiable = tm, comfy.ops, comfy.supported_models, QuantizedTensor, differentiable
    with torch.inference_mode():
        g.float_model = tm.tiny_model(0)
    g.linears = [n for n, mod in g.float_model.model.diffusion_model.named_modules() if isinstance(mod, torch.nn.Linear)]
    return g


def quantized(g, fmt):
    """A tiny SD1.5 as ComfyUI 0.33 loads a quantized checkpoint: its config's quant_config makes BaseModel pick
    the mixed-precision ops, whose Linear layers read `comfy_quant` and the weight scale from the state dict into
    comfy-kitchen QuantizedTensor weights (built and loaded in inference mode, as ComfyUI's executor does)."""
    with torch.inference_mode():
        config = g.supported.SD15(dict(g.tm.SD15_UNET))
        config.quant_config = {"mixed_ops": True}
        config.set_inference_dtype(torch.float32, torch.float32)
        model = config.get_model({}, device="cpu")
        sd = dict(g.float_model.model.diffusion_model.state_dict())
        for name in g.linears:
            w = sd[f"{name}.weight"]
            limit = 448.0 if fmt == "float8_e4m3fn" else 127.0
            scale = w.abs().max() / limit
            q = (w / scale).to(torch.float8_e4m3fn) if fmt == "float8_e4m3fn" else (w / scale).round().to(torch.int8)
            sd[f"{name}.weight"], sd[f"{name}.weight_scale"] = q, scale.reshape(())
            sd[f"{name}.comfy_quant"] = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
        model.load_model_weights(sd, "")
    return model


def dequantized(g, net):
    """The float model holding the quantized model's values."""
    with torch.inference_mode():
        ref = g.tm.tiny_model(0).model.diffusion_model
        ref.load_state_dict({k: (v.dequantize() if isinstance(v, g.Quantized) else v) for k, v in params(net).items()})
    return ref


def gradient(g, net, seed=0):
    """d <out, v> / dx of one model call, inside `differentiable` as the gradient passes run it."""
    gen = torch.Generator().manual_seed(seed)
    x, context = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 64, generator=gen)
    v = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([500.0, 500.0])
    with g.differentiable([net]):
        x = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad((net(x, t, context=context) * v).sum(), x)
    return grad


def params(net):
    """The module's own parameter and buffer objects (the mixed-precision layers' state_dict unpacks them)."""
    return {**dict(net.named_parameters()), **dict(net.named_buffers())}


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_weights_differentiate_like_their_dequantized_values(g, fmt):
    """float8 (emulated on the CPU: each layer dequantizes its weight) agrees to float noise; int8 runs comfy-kitchen's
    quantized forward (activations quantized too) with the straight-through backward of 0.33's QuantLinearFunc,
    so the gradient agrees to the activations' quantization error."""
    net = quantized(g, fmt).diffusion_model
    before = params(net)
    assert sum(isinstance(v, g.Quantized) for v in before.values()) == len(g.linears)
    ours, ref = gradient(g, net), gradient(g, dequantized(g, net))
    error = ((ours - ref).norm() / ref.norm()).item()
    print(f"{fmt}: gradient {error:.2e} relative to the dequantized model's")
    assert error <= (1e-5 if fmt == "float8_e4m3fn" else 1e-3), error
    after = params(net)
    assert all(after[k] is v and v.is_inference() for k, v in before.items())


def test_exact_anchor_sync_runs_on_quantized_weights(g):
    """Through the real nodes: exact AnchorSync on the int8 model moves the result, and the model's quantized weights
    are its own inference tensors again."""
    import lpips_weights
    from controlsync.nodes.anchor_sync import AnchorSync
    from controlsync.nodes.controlsync_sampler import ControlSyncSampler
    from controlsync.nodes.window_planner import WindowPlanner
    lpips_weights.use_cached_backbones()
    import comfy.model_patcher
    model = quantized(g, "int8_tensorwise")
    net = model.diffusion_model
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    plan = WindowPlanner.execute(192, 64, 64, 64, 32, "first", 0, "uniform").args[0]
    latent = {"samples": torch.zeros(1, 4, 8, 24)}
    with torch.inference_mode():
        vae = g.tm.tiny_vae()
        sync = AnchorSync.execute(vae, 20.0, 0.95, 50, "alex", "exact").args[0]
        pos, neg = g.tm.text_cond(10), g.tm.text_cond(11)
        run = lambda s: ControlSyncSampler.execute(patcher, 3, 3, 7.5, "euler", "normal", pos, neg, latent, plan, 1.0,  # noqa: E731
                                                   1, s).args[0]["samples"]
        plain = run(None)
        before = params(net)  # as ComfyUI's loader left them
        synced = run(sync)
    assert torch.isfinite(synced).all()
    assert (synced - plain).abs().max() > 1e-4 * plain.abs().max()
    after = params(net)
    assert sum(isinstance(v, g.Quantized) for v in after.values()) == len(g.linears)
    assert all(after[k] is v and v.is_inference() for k, v in before.items())


# --- tensor subclasses (ComfyUI-GGUF) ---------------------------------------------------------------

class Q8Tensor(torch.Tensor):
    """What ComfyUI-GGUF's GGMLTensor is: a plain torch.Tensor subclass whose own storage holds the quantized values,
    with the quantization type and the logical shape as attributes; detach and clone hand back the tensor itself.
    Here the values are int8 with one scale (GGML's Q8_0 keeps per-block scales inside the bytes)."""

    def __new__(cls, data, *, tensor_type, tensor_shape, scale):
        return super().__new__(cls, data)

    def __init__(self, data, *, tensor_type, tensor_shape, scale):
        super().__init__()
        self.tensor_type, self.tensor_shape, self.scale = tensor_type, tensor_shape, scale

    def detach(self, *args, **kwargs):
        return self

    def clone(self, *args, **kwargs):
        return self


def _q8_ops(g):
    """Custom operations as ComfyUI-GGUF hands ComfyUI its GGMLOps (model_options["custom_operations"]): the layer
    dequantizes its weight for each call, reading the attributes."""
    class Q8Ops(g.ops.manual_cast):
        class Linear(g.ops.manual_cast.Linear):
            def forward_comfy_cast_weights(self, input, *args, **kwargs):
                w = self.weight
                if getattr(w, "tensor_type", None) != "Q8":
                    raise ValueError(f"{type(w).__name__} weight lost its quantization type")
                weight = w.as_subclass(torch.Tensor).to(input.dtype).reshape(w.tensor_shape) * w.scale
                return torch.nn.functional.linear(input, weight, self.bias)
    return Q8Ops


def test_tensor_subclass_weights_keep_their_class_in_the_gradient_pass(g):
    with torch.inference_mode():
        config = g.supported.SD15(dict(g.tm.SD15_UNET))
        config.custom_operations = _q8_ops(g)
        config.set_inference_dtype(torch.float32, None)
        net = config.get_model({}, device="cpu").diffusion_model
        sd = dict(g.float_model.model.diffusion_model.state_dict())
        net.load_state_dict(sd)
        for name in g.linears:
            layer = net.get_submodule(name)
            w = sd[f"{name}.weight"]
            scale = w.abs().max() / 127.0
            q = Q8Tensor((w / scale).round().to(torch.int8).flatten(), tensor_type="Q8", tensor_shape=w.shape, scale=scale)
            layer.weight = torch.nn.Parameter(q, requires_grad=False)
            layer.comfy_cast_weights = True
        ref = g.tm.tiny_model(0).model.diffusion_model
        ref.load_state_dict({k: (v.as_subclass(torch.Tensor).float().reshape(v.tensor_shape) * v.scale
                                 if isinstance(v, Q8Tensor) else v) for k, v in params(net).items()})
    before = params(net)
    ours, expected = gradient(g, net), gradient(g, ref)
    assert ((ours - expected).norm() / expected.norm()).item() <= 1e-5
    after = params(net)
    assert all(after[k] is v and v.is_inference() for k, v in before.items())
    assert all(type(after[f"{n}.weight"]) is Q8Tensor for n in g.linears)


# --- weights cast into a reused buffer ---------------------------------------------------------------

def test_weights_saved_as_views_of_a_reused_buffer_are_copied(g):
    """Dynamic VRAM hands each layer its weight as a view of a cast buffer (comfy/ops.py cast_modules_with_vbar:
    a tensor made from the buffer's raw pointer, viewed as the weight); the next layers' casts overwrite it before
    backward runs. Here ComfyUI's weight functions (the LoRA hook of cast_bias_weight) put each layer's weight into
    one shared buffer the same way; the gradient equals the plain layers' only because the saved views are copied."""
    with torch.inference_mode():
        layers = [g.ops.manual_cast.Linear(16, 16) for _ in range(3)]
        gen = torch.Generator().manual_seed(0)
        for layer in layers:
            layer.weight = torch.nn.Parameter(torch.randn(16, 16, generator=gen) / 4, requires_grad=False)
            layer.bias = torch.nn.Parameter(torch.randn(16, generator=gen) / 4, requires_grad=False)
    buffer = torch.empty(256)

    def into_buffer(weight):
        raw = torch.empty(0).set_(buffer.untyped_storage())  # its own version counter, like a raw pointer's tensor
        raw.copy_(weight.flatten())
        return raw[:256].view(16, 16)

    def net(x, cast):
        for layer in layers:
            layer.weight_function = [into_buffer] if cast else []
            x = torch.tanh(layer(x))
        return x.square().sum()
    x0 = torch.randn(4, 16, generator=gen)

    def gradient_of(cast):
        with g.differentiable(layers):
            x = x0.clone().requires_grad_(True)
            return torch.autograd.grad(net(x, cast), x)[0]
    import controlsync.nodes.bridge.autograd as autograd
    try:
        plain, cast = gradient_of(False), gradient_of(True)
        original, autograd._is_cast_view = autograd._is_cast_view, lambda t: False
        try:
            uncopied = gradient_of(True)  # what autograd computes from the overwritten buffer
        finally:
            autograd._is_cast_view = original
    finally:
        for layer in layers:
            layer.weight_function = []
    assert torch.allclose(cast, plain, rtol=1e-6, atol=1e-7)
    assert (uncopied - plain).norm() > 0.1 * plain.norm()
