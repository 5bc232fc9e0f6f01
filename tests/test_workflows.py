"""The shipped workflows as a user opens them: model metadata the frontend's missing-models dialog reads, the
registry ids it writes, the pack's namespaced socket types, notes that say what to download, and images
that reach ComfyUI's input folder. Every workflows/*.json is checked (no ComfyUI server needed)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import tomllib
from pathlib import Path

import pytest

from comfy_host import host_overlay, old_host
from e2e_assets import STAND_INS
from e2e_family_assets import STAND_INS as FAMILY_STAND_INS

# every file a workflow names, with the model folder of its random-weight stand-in on the end-to-end servers
ALL_STAND_INS = {**STAND_INS, **FAMILY_STAND_INS}
# files no stand-in can replace here, and why
NO_STAND_IN = {"t5xxl_fp16.safetensors": "ComfyUI builds Flux's T5-XXL with a fixed 4.7 B-parameter config (9.5 GB): "
                                         "the Flux end-to-end run swaps its DualCLIPLoader for CLIPLoader (clip_l)",
               "qwen_3_4b.safetensors": "ComfyUI builds Z-Image's Qwen3-4B with a fixed 4 B-parameter config (8 GB): the "
                                        "Z-Image end-to-end run gives its CLIPLoader clip_l"}
# files ComfyUI's templates do not name: their publishers' own repositories
PUBLISHERS = {
    "controlnet-canny-sdxl-1.0.safetensors":
        "https://huggingface.co/xinsir/controlnet-canny-sdxl-1.0/resolve/main/diffusion_pytorch_model.safetensors",
    "flux-canny-controlnet-v3.safetensors":
        "https://huggingface.co/XLabs-AI/flux-controlnet-canny-v3/resolve/main/flux-canny-controlnet-v3.safetensors",
}

PACK = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((PACK / "workflows").glob("*.json"))
PROJECT = tomllib.loads((PACK / "pyproject.toml").read_text())["project"]
PACK_NODE_PREFIXES = ("ControlSync",)
PACK_NODES = {"WindowPlanner", "AnchorSync", "FactorGraphCollage"}
# ComfyUI's loaders: the widget naming the file and the model folder it reads
LOADERS = {"CheckpointLoaderSimple": "checkpoints", "ControlNetLoader": "controlnet", "VAELoader": "vae",
           "UNETLoader": "diffusion_models", "CLIPLoader": "text_encoders", "DualCLIPLoader": "text_encoders",
           "LoraLoader": "loras", "LoraLoaderModelOnly": "loras", "UpscaleModelLoader": "upscale_models"}
SEMVER = re.compile(r"^\d+\.\d+\.\d+$")


def is_pack_node(node_type: str) -> bool:
    return node_type in PACK_NODES or node_type.startswith(PACK_NODE_PREFIXES)


def template_files() -> list[Path]:
    """ComfyUI's own workflow templates as the tested hosts ship them. The venv's: from 0.11 the JSON files sit in
    comfyui-workflow-templates-json, listed by comfyui-workflow-templates-core's manifest; before, in the package's
    templates/ folder. Plus the release the older host pins (0.1.95 for 0.3.64, from its overlay folder:
    comfy_host.host_overlay), which still has the SD1.5 and ControlNet 1.1 templates that 0.11 dropped."""
    files = []
    if importlib.util.find_spec("comfyui_workflow_templates_core") is not None:
        import comfyui_workflow_templates_core as core
        files += [Path(core.get_asset_path(t.template_id, f"{t.template_id}.json")) for t in core.iter_templates()]
    elif importlib.util.find_spec("comfyui_workflow_templates") is not None:
        spec = importlib.util.find_spec("comfyui_workflow_templates")
        files += sorted((Path(list(spec.submodule_search_locations)[0]) / "templates").glob("*.json"))
    else:
        pytest.skip("comfyui-workflow-templates (a ComfyUI requirement) is not installed")
    old = old_host()
    if old is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("the older ComfyUI host (its pinned workflow templates) not found under CI: .ci/run provides it")
        pytest.skip("the older ComfyUI host (its pinned workflow templates) not found (set COMFYUI_OLD_PATH)")
    overlay = host_overlay(old)
    if overlay is not None:
        files += sorted((overlay / "comfyui_workflow_templates" / "templates").glob("*.json"))
    return files


def template_models() -> dict[str, set[str]]:
    """{file name: its urls (queries stripped)} from ComfyUI's own workflow templates (template_files); a file some
    templates take from another repository (ae.safetensors: Flux's, HiDream's, Lumina's) has several."""
    found = {}
    for path in template_files():
        try:
            workflow = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        for node in workflow.get("nodes", []) if isinstance(workflow, dict) else []:
            for model in (node.get("properties") or {}).get("models") or []:
                found.setdefault(model["name"], set()).add(strip_query(model["url"]))
    return found


def expected_urls(name: str, templates: dict[str, set[str]]) -> set[str]:
    """The public addresses of a standard file (queries stripped), from a source independent of this pack."""
    if name in templates:  # ComfyUI's templates name it
        return templates[name]
    if name in PUBLISHERS:
        return {strip_query(PUBLISHERS[name])}
    if name.startswith("control_v11"):  # the same repository as the templates' other ControlNet 1.1 fp16 files
        sibling = next(n for n in templates if n.startswith("control_v11") and n.endswith("_fp16.safetensors"))
        return {url.replace(sibling, name) for url in templates[sibling]}
    if name.endswith(".pth"):  # torchvision's ImageNet weights (the LPIPS backbones)
        import torchvision.models
        for weights in torchvision.models.list_models():
            enum = torchvision.models.get_model_weights(weights)
            for w in enum:
                if w.url.endswith("/" + name):
                    return {strip_query(w.url)}
    raise AssertionError(f"no independent address known for {name}: add it to this test")


def strip_query(url: str) -> str:
    return url.split("?")[0]


def all_models(workflow: dict) -> list[dict]:
    return list(workflow.get("models") or []) + [m for n in workflow["nodes"]
                                                 for m in (n.get("properties") or {}).get("models") or []]


def test_every_workflow_is_checked():
    assert len(WORKFLOWS) >= 6, WORKFLOWS


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_loaders_carry_model_metadata_with_public_addresses(path):
    """Each loader's file has a `properties.models` entry (name = the widget value, the loader's folder), as
    in ComfyUI's templates; every listed file has its public address (checked against the templates /
    torchvision, or the publisher's repository for the two ControlNets the templates do not name) and a stand-in
    the end-to-end servers provide (tests/e2e_assets.py, tests/e2e_family_assets.py)."""
    workflow = json.loads(path.read_text())
    templates = template_models()
    for node in workflow["nodes"]:
        if node["type"] in LOADERS:
            models = (node.get("properties") or {}).get("models") or []
            names = {m["name"]: m for m in models}
            files = [v for v in node["widgets_values"] if isinstance(v, str) and "." in v]
            assert files and all(f in names for f in files), f"{path.name} #{node['id']} {node['type']}: {models}"
            assert all(names[f]["directory"] == LOADERS[node["type"]] for f in files)
    for model in all_models(workflow):
        assert set(model) >= {"name", "url", "directory"}
        assert strip_query(model["url"]) in expected_urls(model["name"], templates), model
        if model["name"] not in NO_STAND_IN:
            assert ALL_STAND_INS.get(model["name"]) == model["directory"], \
                f"{path.name}: {model['name']} -> add a stand-in in tests/e2e_assets.py STAND_INS"


def test_anchorsync_workflow_lists_its_lpips_backbone():
    """The frontend reads a node's `models` only when the file name is one of its widget values; AnchorSync names
    the net ('vgg'), so the backbone is listed at the workflow's top level, which the frontend always reads."""
    workflow = json.loads((PACK / "workflows" / "controlsync_anchorsync.json").read_text())
    sync = next(n for n in workflow["nodes"] if n["type"] == "AnchorSync")
    net = sync["widgets_values"][3]
    from lpips_weights import BACKBONE_FILES
    assert [m["name"] for m in workflow["models"]] == [BACKBONE_FILES[net]]
    assert workflow["models"][0]["directory"] == "lpips"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_nodes_carry_registry_ids_and_namespaced_sockets(path):
    """What the frontend writes when it saves: `cnr_id` / `ver` per node (the pack's registry id and version
    from pyproject.toml; comfy-core for ComfyUI's nodes); the pack's sockets only under their namespaced types."""
    workflow = json.loads(path.read_text())
    for node in workflow["nodes"]:
        if node["type"] in ("MarkdownNote", "Note"):
            continue
        props = node["properties"]
        if is_pack_node(node["type"]):
            assert (props["cnr_id"], props["ver"]) == (PROJECT["name"], PROJECT["version"]), node["type"]
        else:
            assert props["cnr_id"] == "comfy-core" and SEMVER.match(props["ver"]), node["type"]
        for slot in (node.get("inputs") or []) + (node.get("outputs") or []):
            assert slot["type"] not in ("SYNC", "WINDOW_PLAN"), (node["type"], slot)
    link_types = {link[5] for link in workflow["links"]}
    assert not link_types & {"SYNC", "WINDOW_PLAN"}
    assert "CONTROLSYNC_WINDOW_PLAN" in link_types
    # the plan previews show on the planner / collage node itself: no Preview Image node for them
    sources = {link[0]: link[1] for link in workflow["links"]}
    types = {n["id"]: n["type"] for n in workflow["nodes"]}
    for node in workflow["nodes"]:
        if node["type"] == "PreviewImage":
            assert types[sources[node["inputs"][0]["link"]]] not in ("WindowPlanner", "FactorGraphCollage")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_notes_say_what_to_download_and_where(path):
    workflow = json.loads(path.read_text())
    notes = "\n".join(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] in ("MarkdownNote", "Note"))
    for model in all_models(workflow):
        assert model["name"] in notes and strip_query(model["url"]) in notes, model["name"]
        assert f"models/{model['directory']}/" in notes, model["directory"]
    for node in workflow["nodes"]:
        if node["type"] == "LoadImage":  # shipped beside the workflow: copied into input/ when ComfyUI starts
            assert (path.parent / node["widgets_values"][0]).is_file(), node["widgets_values"][0]


def _example_images():
    spec = importlib.util.spec_from_file_location("controlsync_example_images", PACK / "nodes" / "example_images.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_images_are_copied_once_and_never_overwrite(tmp_path):
    images = _example_images()
    shipped = sorted(p.name for p in (PACK / "workflows").iterdir() if p.suffix.lower() in images.IMAGE_SUFFIXES)
    loaded = {n["widgets_values"][0] for path in WORKFLOWS for n in json.loads(path.read_text())["nodes"]
              if n["type"] == "LoadImage"}
    assert loaded <= set(shipped) and all(name.startswith("controlsync_") for name in shipped)
    user_file = tmp_path / shipped[0]
    user_file.write_bytes(b"the user's own file")
    assert images.copy_example_images(str(tmp_path)) == shipped[1:]
    assert user_file.read_bytes() == b"the user's own file"
    for name in shipped[1:]:
        assert (tmp_path / name).read_bytes() == (PACK / "workflows" / name).read_bytes()
    assert images.copy_example_images(str(tmp_path)) == []
