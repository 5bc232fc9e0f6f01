"""LPIPS built offline from torchvision's backbone file (the lpips package ships only its linear heads)."""
from __future__ import annotations

import os

import torch

LPIPS_BACKBONES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
VGG19_FILE = "vgg19-dcbb9e9d.pth"  # torchvision's ImageNet VGG19, for the paper's style loss
# torchvision's official copies of the files and their sizes, for the missing-file message (never downloaded here)
WEIGHTS_URL = "https://download.pytorch.org/models/"
WEIGHTS_MB = {"vgg16-397923af.pth": 528, "alexnet-owt-7be5be79.pth": 233, VGG19_FILE: 548}
_VGG19 = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512]
_VGG19_STYLE_LAYERS = (1, 6, 11, 20, 29)  # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 in torchvision's `features`


def find_weights(name: str, folders: list[str], purpose: str) -> str:
    """`name` in the first of `folders` that has it; a clear error naming the file and the folders otherwise."""
    for folder in folders:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"{purpose} needs torchvision's ImageNet backbone file '{name}', found in none of: {', '.join(folders)}. "
        f"Download it ({WEIGHTS_MB.get(name, '?')} MB) from {WEIGHTS_URL}{name} and put it into "
        f"ComfyUI/models/lpips/ (nothing is downloaded at run time).")


def find_backbone(net: str, folders: list[str]) -> str:
    return find_weights(LPIPS_BACKBONES[net], folders, f"LPIPS-{net}")


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


def build_vgg19_style(path: str):
    """A callable image (N, 3, H, W) in [-1, 1] -> the five VGG19 style layers (relu1_1 .. relu5_1), built
    from torchvision's VGG19 file without torchvision (the layer list is VGG's configuration E)."""
    layers, channels = [], 3
    for v in _VGG19:
        if v == "M":
            layers.append(torch.nn.MaxPool2d(2, 2))
        else:
            layers += [torch.nn.Conv2d(channels, v, 3, padding=1), torch.nn.ReLU()]
            channels = v
    net = torch.nn.Sequential(*layers)
    state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict({k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")})
    net = net.eval().requires_grad_(False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

    def features(image):
        h, out = ((image + 1) / 2 - mean) / std, []
        for i, layer in enumerate(net):
            h = layer(h)
            if i in _VGG19_STYLE_LAYERS:
                out.append(h)
            if i >= _VGG19_STYLE_LAYERS[-1]:
                break
        return out
    return features
