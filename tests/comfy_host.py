"""Find the ComfyUI host the way users have it, and import it in-process on the CPU.

Order: $COMFYUI_PATH, the ComfyUI this pack sits in (ComfyUI/custom_nodes/<pack>), ~/comfy/ComfyUI.
The pack is imported as the package `controlsync` (its folder name may be anything).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent


def find_host() -> Path | None:
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]))
    if PACK_DIR.parent.name == "custom_nodes":
        candidates.append(PACK_DIR.parent.parent)
    candidates.append(Path.home() / "comfy" / "ComfyUI")
    for c in candidates:
        if (c / "main.py").is_file() and (c / "comfy").is_dir():
            return c.resolve()
    return None


def old_host() -> Path | None:
    """The older ComfyUI the end-to-end tests also run: $COMFYUI_OLD_PATH, else ~/comfy/ComfyUI-0.3.50."""
    path = Path(os.environ.get("COMFYUI_OLD_PATH") or Path.home() / "comfy" / "ComfyUI-0.3.50")
    return path.resolve() if (path / "main.py").is_file() and (path / "comfy").is_dir() else None


def host_version(host: Path) -> str:
    text = (host / "comfyui_version.py").read_text()
    return text.split("__version__")[1].split('"')[1]


def import_host(host: Path, cpu: bool = True):
    """Put ComfyUI on sys.path (CPU arguments unless `cpu` is False), import it, and load the pack as `controlsync`."""
    if str(host) not in sys.path:
        sys.path.insert(0, str(host))
    import comfy.cli_args
    comfy.cli_args.args.cpu = cpu
    comfy.cli_args.args.disable_all_custom_nodes = True
    import comfy.model_management  # noqa: F401  (reads args.cpu at import)
    import nodes  # noqa: F401  (ComfyUI's nodes.py)
    return load_pack()


def load_pack():
    if "controlsync" in sys.modules:
        return sys.modules["controlsync"]
    spec = importlib.util.spec_from_file_location("controlsync", PACK_DIR / "__init__.py",
                                                  submodule_search_locations=[str(PACK_DIR)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["controlsync"] = module
    spec.loader.exec_module(module)
    return module


def load_sampling():
    """The pack's `sampling` package on its own, proving it needs no ComfyUI."""
    name = "controlsync_sampling"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PACK_DIR / "sampling" / "__init__.py",
                                                      submodule_search_locations=[str(PACK_DIR / "sampling")])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
