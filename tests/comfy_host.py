"""Find the ComfyUI host the way users have it, and import it in-process on the CPU.

Order: $COMFYUI_PATH, the ComfyUI this pack sits in (ComfyUI/custom_nodes/<pack>), ~/comfy-0.33.0/ComfyUI (what
.ci/run builds), ~/comfy/ComfyUI (setup_comfyui_host.sh's default).
The pack is imported as the package `controlsync` (its folder name may be anything).
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
# the ComfyUI releases the README says the pack is tested with: the main host and the older one the end-to-end
# servers also run (.ci/run builds both: ~/comfy-0.33.0/ComfyUI and ~/comfy-0.33.0/ComfyUI-0.3.64, one venv)
MAIN_VERSION, OLD_VERSION = "0.33.0", "0.3.64"
HOME_DIRS = (Path.home() / f"comfy-{MAIN_VERSION}", Path.home() / "comfy")
OVERLAYS = PACK_DIR / "tests" / ".cache" / "host-overlays"


def find_host() -> Path | None:
    candidates = []
    if os.environ.get("COMFYUI_PATH"):
        candidates.append(Path(os.environ["COMFYUI_PATH"]))
    if PACK_DIR.parent.name == "custom_nodes":
        candidates.append(PACK_DIR.parent.parent)
    candidates += [home / "ComfyUI" for home in HOME_DIRS]
    for c in candidates:
        if (c / "main.py").is_file() and (c / "comfy").is_dir():
            return c.resolve()
    return None


def old_host() -> Path | None:
    """The older ComfyUI the end-to-end tests also run: $COMFYUI_OLD_PATH, else ComfyUI-0.3.64 beside the main
    host's work tree (~/comfy-0.33.0/ComfyUI-0.3.64, ~/comfy/ComfyUI-0.3.64)."""
    if os.environ.get("COMFYUI_OLD_PATH"):
        candidates = [Path(os.environ["COMFYUI_OLD_PATH"])]
    else:
        candidates = [home / f"ComfyUI-{OLD_VERSION}" for home in HOME_DIRS]
    for path in candidates:
        if (path / "main.py").is_file() and (path / "comfy").is_dir():
            return path.resolve()
    return None


def host_version(host: Path) -> str:
    text = (host / "comfyui_version.py").read_text()
    return text.split("__version__")[1].split('"')[1]


def ui_pins(host: Path) -> dict[str, str]:
    """The versions a host's requirements.txt pins of ComfyUI's own packages (frontend, workflow templates,
    embedded docs): a server imports them at start and older hosts break on newer layouts."""
    pins = {}
    for line in (host / "requirements.txt").read_text().splitlines():
        match = re.fullmatch(r"(comfyui-[a-z-]+)==([\w.]+)", line.strip())
        if match:
            pins[match.group(1)] = match.group(2)
    return pins


def host_overlay(host: Path, python: str = sys.executable) -> Path | None:
    """A folder to put first on the server's PYTHONPATH so that `host` gets the versions of ComfyUI's own
    packages it pins where `python`'s venv has others (0.3.64's server in 0.33's venv: it needs the
    workflow-templates layout of 0.1.x); None when the venv has them. Installed once (pip --target --no-deps,
    the venv untouched) into tests/.cache/host-overlays/ComfyUI-<version>, under a lock for parallel workers."""
    pins = ui_pins(host)
    query = ("import importlib.metadata as m, json, sys\n"
             "def v(n):\n    try: return m.version(n)\n    except m.PackageNotFoundError: return None\n"
             "print(json.dumps({n: v(n) for n in sys.argv[1:]}))")
    installed = json.loads(subprocess.run([python, "-c", query, *pins], capture_output=True, text=True,
                                          check=True).stdout)
    if all(installed[name] == version for name, version in pins.items()):
        return None
    folder = OVERLAYS / f"ComfyUI-{host_version(host)}"
    marker = folder / "pins.json"
    if marker.is_file() and json.loads(marker.read_text()) == pins:
        return folder
    from e2e_assets import _locked
    with _locked(OVERLAYS / "overlay.lock"):
        if marker.is_file() and json.loads(marker.read_text()) == pins:
            return folder
        tmp = OVERLAYS / f"tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        proc = subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp),
                               *(f"{name}=={version}" for name, version in pins.items())],
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(f"installing {pins} for ComfyUI {host_version(host)} into {tmp} failed:\n"
                               f"{proc.stderr[-4000:]}")
        (tmp / "pins.json").write_text(json.dumps(pins))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return folder


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


if __name__ == "__main__":  # .ci/run: `python tests/comfy_host.py overlay HOST` installs a host's overlay up front
    if len(sys.argv) != 3 or sys.argv[1] != "overlay":
        sys.exit("usage: comfy_host.py overlay COMFYUI_DIR")
    print(host_overlay(Path(sys.argv[2]).resolve()) or "no overlay needed")
