"""LPIPS built offline from torchvision's backbone file (the lpips package ships only its linear heads)."""
from __future__ import annotations

import os

import torch

LPIPS_BACKBONES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


def find_backbone(net: str, folders: list[str]) -> str:
    """The backbone file for `net` in the first of `folders` that has it; a clear error otherwise."""
    name = LPIPS_BACKBONES[net]
    for folder in folders:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"LPIPS-{net} needs torchvision's ImageNet backbone file '{name}', found in none of: {', '.join(folders)}. "
        f"Put '{name}' into ComfyUI/models/lpips/ (nothing is downloaded at run time); the LPIPS heads come "
        f"with the lpips package.")


def build_lpips(net: str, backbone_path: str) -> torch.nn.Module:
    """LPIPS v0.1 with the backbone loaded from `backbone_path`, in eval mode, without requires_grad.
    Built outside inference mode so that gradients can flow through it."""
    import lpips
    with torch.inference_mode(False):
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
        state = torch.load(backbone_path, map_location="cpu", weights_only=True)
        for block in model.net.children():
            for index, layer in block.named_children():
                for name, param in layer.named_parameters():
                    param.data.copy_(state[f"features.{index}.{name}"])
        return model.eval().requires_grad_(False)


def hub_checkpoints() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints")
