"""ComfyUI's real frontend in a real browser (headless Chromium driven by playwright): every shipped
workflow is loaded through the page (`app.loadGraphData`), its widgets are shrunk for a CPU run the way a
user edits them, it is queued from the page (`app.queuePrompt`: the frontend's own graph-to-API
conversion) and its images must arrive - each small workflow on one of the two frontends (RUN_ON), converted
on the other; the SDXL and Flux workflows are converted on both (their stand-ins run in test_e2e_families.py).
Also: the pack's nodes are found by the frontend's own search for
panorama / 360 / seamless / ..., workflows saved with the old socket type names still load with their
links, the Coherence Report's numbers show on the node, the missing-models dialog of the older host's frontend
accepts the pack's `lpips` folder, and the newer frontends' Errors / Issues panel lists a missing loader file with
its folder.

Three frontends, one server each: on the main host the one ComfyUI pins (its requirements.txt; the host's venv has
it) and the newest `comfyui-frontend-package` from the registry, served with `--front-end-root`
(.ci/run installs it into tests/.cache/frontend-latest); on the older host (0.3.64) the one it pins (1.27.10, from
its overlay folder: comfy_host.host_overlay), which still has the missing-models dialog - every workflow is
converted there, none queued. Chromium is Debian's (`/usr/bin/chromium`, or
$CONTROLSYNC_CHROMIUM); playwright's Python client drives it (no browser download). Missing pieces fail
under CI=true and skip otherwise.
"""
from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest

from comfy_host import PACK_DIR, find_host, old_host
from e2e_assets import STAND_INS, ensure_assets
from test_e2e_server import ComfyServer, ensure_lpips, http_json, require

WORKFLOWS = sorted((PACK_DIR / "workflows").glob("*.json"))
LATEST_FRONTEND = Path(__file__).resolve().parent / ".cache" / "frontend-latest"
CHROMIUM = os.environ.get("CONTROLSYNC_CHROMIUM", "/usr/bin/chromium")
RUN_TIMEOUT = 300
SMALL_HEIGHT, SMALL_WIDTH = 128, 384  # the shipped images are shrunk to 128 px high, at most 384 wide, for the CPU run
# every small workflow is queued from the page once, half on each frontend (CPU time), and converted on the other;
# the newest (users update it on its own) gets the ones with the most pack UI: plan preview, sync, the Coherence
# Report's text widget, the loop and cubemap decodes
RUN_ON = {"latest": ("controlsync_anchorsync", "collage_loop360", "collage_cubemap360"),
          "pinned": ("controlsync_panorama", "collage_chain_prompts", "collage_outpaint")}
CHAIN_PROMPTS = ["a city skyline at dawn, oil painting", "suburbs in the morning sun, oil painting",
                 "a road through dry scrubland at midday, oil painting", "desert dunes in the afternoon, oil painting",
                 "a sand desert at dusk, oil painting"]
# What a user would change for a quick look, per node type (any workflow using these nodes gets the same edits)
SMALL_WIDGETS = {
    "WindowPlanner": {"window_width": 128, "window_height": 128, "stride": 64, "width": 384, "height": 128},
    "ControlSyncSampler": {"steps": 2},
    "AnchorSync": {"lpips_net": "alex", "sync_steps": 25},  # 25 of 50 -> the first of 2 steps is synced
    "ControlSyncCoherenceReport": {"crop": 64, "lpips_net": "alex"},
    "ControlSyncEquirectToCubemap": {"face_size": 64},
    "ControlSyncLoopDecode": {"wrap_cells": 4},
    "ImagePadForOutpaint": {"left": 192, "right": 192},
}
COLLAGE_SMALL = {"width": 384, "height": 128, "window_width": 128, "window_height": 128, "overlap": 64}
CUBEMAP_SMALL = {"width": 64, "height": 64, "window_width": 64, "window_height": 64, "overlap": 32}
SEARCH_WORDS = ("panorama", "360", "seamless", "tiled diffusion", "MultiDiffusion", "SyncDiffusion", "DiffCollage",
                "cubemap", "equirectangular")


def pinned_version(host: Path) -> str:
    for line in (host / "requirements.txt").read_text().splitlines():
        if line.startswith("comfyui-frontend-package=="):
            return line.split("==")[1].strip()
    raise AssertionError("the host's requirements.txt pins no comfyui-frontend-package")


def latest_frontend() -> tuple[Path, str] | None:
    info = sorted(LATEST_FRONTEND.glob("comfyui_frontend_package-*.dist-info"))
    static = LATEST_FRONTEND / "comfyui_frontend_package" / "static"
    if not info or not (static / "index.html").is_file():
        return None
    return static, info[-1].name.removeprefix("comfyui_frontend_package-").removesuffix(".dist-info")


def small_copies(input_dir: Path) -> dict[str, str]:
    """Each shipped image shrunk to SMALL_HEIGHT px high and at most SMALL_WIDTH wide (sides multiples of 8; a
    squeezed panorama samples like any other): {name: small name}."""
    from PIL import Image
    names = {}
    for path in sorted((PACK_DIR / "workflows").iterdir()):
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
            continue
        with Image.open(path) as image:
            width = min(SMALL_WIDTH, max(8, round(image.width * SMALL_HEIGHT / image.height / 8) * 8))
            image.convert("RGB").resize((width, SMALL_HEIGHT), Image.LANCZOS).save(input_dir / f"small_{path.stem}.png")
        names[path.name] = f"small_{path.stem}.png"
    return names


@pytest.fixture(scope="module", params=["pinned", "latest", "old"])
def browser_page(request, tmp_path_factory):
    main = require(find_host(), "the main ComfyUI host")
    host = main if request.param != "old" else require(old_host(), "the old ComfyUI host (0.3.64; set COMFYUI_OLD_PATH)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(None, "playwright's Python client (pip install playwright)")
    require(Path(CHROMIUM) if Path(CHROMIUM).is_file() else None, f"Chromium at {CHROMIUM} (apt-get install chromium)")
    extra, expected = [], pinned_version(host)
    if request.param == "latest":
        found = require(latest_frontend(), f"the newest comfyui-frontend-package in {LATEST_FRONTEND} (.ci/run)")
        extra, expected = ["--front-end-root", str(found[0])], found[1]
    assets = ensure_assets(main)
    srv = ComfyServer(host, tmp_path_factory.mktemp(f"browser-{request.param}"), assets, ensure_lpips(main), extra)
    try:
        srv.wait_ready()
        # a returning user: a fresh user's first page opens the template browser over the canvas
        urllib.request.urlopen(urllib.request.Request(srv.url + "/settings/Comfy.TutorialCompleted", data=b"true",
                                                      method="POST"), timeout=30).close()
        srv.small_images = small_copies(srv.input_dir)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.errors = []
            page.on("pageerror", lambda e: page.errors.append(str(e)))
            page.goto(srv.url)
            page.wait_for_function("() => window.app && window.app.graph && window.app.vueAppReady", timeout=120_000)
            version = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
            assert version == expected, f"served frontend {version}, expected {expected}"
            page.server, page.frontend = srv, f"{request.param} {version}"
            yield page
            browser.close()
    finally:
        srv.stop()


def needs_large_models(workflow: dict) -> bool:
    """Whether a workflow names models without a small stand-in here (the SDXL and Flux workflows)."""
    models = list(workflow.get("models") or []) + [m for n in workflow["nodes"]
                                                   for m in (n.get("properties") or {}).get("models") or []]
    return not all(STAND_INS.get(m["name"]) == m["directory"] for m in models)


def test_every_small_workflow_is_queued_on_one_frontend():
    small = {p.stem for p in WORKFLOWS if not needs_large_models(json.loads(p.read_text()))}
    assert sorted(RUN_ON["latest"] + RUN_ON["pinned"]) == sorted(small)


def load(page, workflow: dict) -> None:
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)


def shrink(page, small_images: dict[str, str]) -> None:
    """Set widget values in the page, as a user edits them."""
    edits = page.evaluate("() => window.app.graph.nodes.map(n => [n.id, n.type, Object.fromEntries((n.widgets || [])"
                          ".filter(w => w.name).map(w => [w.name, typeof w.value === 'object' ? null : w.value]))])")
    for node_id, node_type, widgets in edits:
        wanted = dict(SMALL_WIDGETS.get(node_type, {}))
        if node_type == "LoadImage" and widgets.get("image") in small_images:
            wanted["image"] = small_images[widgets["image"]]
        if node_type == "FactorGraphCollage":
            wanted.update(CUBEMAP_SMALL if widgets.get("graph") == "cubemap" else COLLAGE_SMALL)
            if widgets.get("prompt_mode") == "per factor":
                wanted["prompts"] = "\n".join(CHAIN_PROMPTS)  # 384 px of 128 px factors overlapping by 64: 5
        for name, value in wanted.items():
            if name in widgets:
                page.evaluate("([id, name, value]) => { const n = window.app.graph.getNodeById(id);"
                              " const w = n.widgets.find(w => w.name === name); w.value = value;"
                              " w.callback?.(value); }", [node_id, name, value])


def queue_and_wait(page) -> dict:
    srv = page.server
    before = set(http_json(srv.url + "/history"))
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        history = http_json(srv.url + "/history")
        new = [entry for pid, entry in history.items() if pid not in before]
        if new and (new[0].get("status") or {}).get("completed") is not None:
            status = new[0]["status"]
            if status.get("status_str") in ("success", "error"):
                return new[0]
        time.sleep(0.5)
    pytest.fail(f"no finished run within {RUN_TIMEOUT}s ({page.frontend}); server log:\n{srv.log_tail()}")


def with_missing_files(workflow: dict) -> dict:
    """The workflow with a missing file listed for the pack's `lpips` folder (the workflow's `models` list, as the
    shipped ones list the LPIPS backbone) and its checkpoint loader naming a missing checkpoint."""
    workflow["models"] = [{"name": "controlsync_not_there.pth", "directory": "lpips",
                           "url": "https://download.pytorch.org/models/controlsync_not_there.pth"}]
    loader = next(n for n in workflow["nodes"] if n["type"] == "CheckpointLoaderSimple")
    loader["widgets_values"] = ["controlsync_not_there.safetensors"]
    loader["properties"]["models"] = [{"name": "controlsync_not_there.safetensors", "directory": "checkpoints",
                                       "url": "https://huggingface.co/controlsync/none/resolve/main/controlsync_not_there.safetensors"}]
    return workflow


# first in the module: a fresh page, no dialog or toast of an earlier run in front of it
def test_missing_models_dialog_accepts_the_lpips_folder(browser_page):
    """The older host's frontend (1.27): a missing file listed for the pack's `lpips` model folder is shown as
    `lpips / <file>` without 'Invalid directory' (the pack registers the folder); the dialog only downloads
    .safetensors from huggingface.co / civitai.com, so for download.pytorch.org's .pth files it shows the file, its
    folder and the address, and the user fetches it (the note and README say so)."""
    if not browser_page.frontend.startswith("old"):
        pytest.skip("frontends 1.48 and newer have no missing-models dialog (their Errors / Issues panel: below)")
    workflow = with_missing_files(json.loads((PACK_DIR / "workflows" / "controlsync_anchorsync.json").read_text()))
    browser_page.evaluate("async () => { await window.app.extensionManager.setting.set("
                          "'Comfy.Workflow.ShowMissingModelsWarning', true); }")
    load(browser_page, workflow)
    dialogs = "() => [...document.querySelectorAll('[role=dialog]')].map(d => d.innerText).join('\\n')"
    deadline, text = time.monotonic() + 30, ""
    while time.monotonic() < deadline and "controlsync_not_there.pth" not in text:
        time.sleep(0.5)
        text = browser_page.evaluate(dialogs)
    assert "lpips / controlsync_not_there.pth" in text and "Invalid directory" not in text, \
        text or "no dialog; the page shows: " + browser_page.evaluate("() => document.body.innerText.slice(0, 1500)")
    browser_page.keyboard.press("Escape")


def test_errors_panel_lists_a_missing_loader_file_with_its_folder(browser_page):
    """Frontends 1.48 and newer (0.33 pins 1.48.7): the side panel's Missing Models list, opened from the toast's
    'View details', names a loader's missing file, its folder and a Download; the workflow's `models` list (the
    LPIPS backbone, which no loader names) is not listed there - the workflow's note names it."""
    if browser_page.frontend.startswith("old"):
        pytest.skip("frontend 1.27 shows the missing-models dialog instead (above)")
    load(browser_page, with_missing_files(json.loads((PACK_DIR / "workflows" / "controlsync_anchorsync.json").read_text())))
    browser_page.get_by_text("View details").first.click(timeout=30_000)
    deadline, lines = time.monotonic() + 30, []
    while time.monotonic() < deadline and "controlsync_not_there.safetensors" not in lines:
        time.sleep(0.5)
        lines = browser_page.evaluate("() => document.body.innerText").splitlines()
    assert "Missing Models" in lines and "controlsync_not_there.safetensors" in lines, lines[:80]
    at = lines.index("controlsync_not_there.safetensors")
    assert lines[at + 1:at + 3] == ["checkpoints", "Download"], lines[at - 5:at + 5]
    assert not any("controlsync_not_there.pth" in line for line in lines)
    browser_page.keyboard.press("Escape")


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_runs_from_the_page(browser_page, path, capsys):
    import numpy as np
    from PIL import Image

    page, srv = browser_page, browser_page.server
    workflow = json.loads(path.read_text())
    load(page, workflow)
    missing = page.evaluate("() => window.app.graph.nodes.map(n => n.type)"
                            ".filter(t => !(t in window.LiteGraph.registered_node_types))")
    assert missing == [], f"{page.frontend}: missing node types {missing}"
    family = needs_large_models(workflow)
    if family or path.stem not in RUN_ON.get(page.frontend.split()[0], ()):
        # the SDXL and Flux workflows: their multi-GB stand-ins live in tests/test_e2e_families.py's server (and
        # Flux's T5-XXL has none); the newest frontend queues one workflow (CPU time). Here the frontend's own
        # conversion must wire every pack node's inputs
        output = page.evaluate("async () => (await window.app.graphToPrompt()).output")
        pack = [n for n in output.values() if n["class_type"] in ("ControlSyncSampler", "WindowPlanner",
                                                                   "FactorGraphCollage", "AnchorSync")]
        sampler = next(n for n in pack if n["class_type"] == "ControlSyncSampler")["inputs"]
        assert all(isinstance(sampler[k], list) for k in ("model", "positive", "negative", "latent_image", "plan"))
        with capsys.disabled():
            print(f"\n[browser] {page.frontend}: {path.name} loads and converts ({len(output)} nodes; run end to end "
                  + ("in test_e2e_families.py)" if family else "on the other frontend)"))
        return
    shrink(page, srv.small_images)
    t0 = time.monotonic()
    entry = queue_and_wait(page)
    elapsed = time.monotonic() - t0
    status = entry["status"]
    assert status["status_str"] == "success", f"{page.frontend} {path.name}: {json.dumps(status)[:3000]}\n{srv.log_tail()}"
    saved = [item for out in entry["outputs"].values() for item in out.get("images", []) if item["type"] == "output"]
    assert len(saved) == 1, entry["outputs"]
    image_path = srv.output_dir / saved[0].get("subfolder", "") / saved[0]["filename"]
    with Image.open(image_path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
        prompt = json.loads(image.info["prompt"])
    assert pixels.std() > 5, f"the saved image is (nearly) constant: {image_path}"
    sampler = next(n for n in prompt.values() if n["class_type"] == "ControlSyncSampler")["inputs"]
    assert sampler["steps"] == 2  # the page's widget edit went through the frontend's conversion
    # the plan preview shows on the planner / collage node itself (its UI output)
    planners = [nid for nid, n in prompt.items() if n["class_type"] in ("WindowPlanner", "FactorGraphCollage")]
    assert planners and all(entry["outputs"].get(nid, {}).get("images") for nid in planners)
    if any(n["class_type"] == "ControlSyncCoherenceReport" for n in prompt.values()):
        shown = page.evaluate("() => [...document.querySelectorAll('textarea.controlsync-report')].map(a => a.value)")
        assert shown and "intra-LPIPS" in shown[0], f"{page.frontend}: report text on the node: {shown}"
    with capsys.disabled():
        print(f"\n[browser] {page.frontend}: {path.name} ran in {elapsed:.1f}s -> {image_path.name} {image.size}"
              + (f"; page errors (the frontend's own, reported, not failed on): {page.errors}" if page.errors else ""))
    page.errors.clear()


def test_pack_nodes_found_by_the_frontends_search(browser_page):
    """The frontend's own node search (its NodeSearchService, as the search box uses it) finds a pack node for
    each word users type, from the display names alone on hosts without schema search aliases."""
    results = browser_page.evaluate("""(words) => {
        const pinia = document.querySelector('#vue-app').__vue_app__.config.globalProperties.$pinia;
        const search = pinia._s.get('nodeDef').nodeSearchService;
        return Object.fromEntries(words.map(w => [w, search.searchNode(w).map(d => d.python_module || '')
            .filter(m => m.startsWith('custom_nodes.')).length]));
    }""", list(SEARCH_WORDS))
    assert all(results[w] > 0 for w in SEARCH_WORDS), f"{browser_page.frontend}: {results}"


def test_workflow_saved_with_old_socket_types_still_loads(browser_page):
    """0.1.0's socket names (WINDOW_PLAN, SYNC): the frontend keeps the links (with the old label) and its API
    prompt still wires the plan and the sync into the sampler; the server checks the nodes' current types."""
    text = (PACK_DIR / "workflows" / "controlsync_anchorsync.json").read_text()
    old = json.loads(text.replace('"CONTROLSYNC_WINDOW_PLAN"', '"WINDOW_PLAN"').replace('"CONTROLSYNC_SYNC"', '"SYNC"'))
    load(browser_page, old)
    output = browser_page.evaluate("async () => (await window.app.graphToPrompt()).output")
    sampler = next(n for n in output.values() if n["class_type"] == "ControlSyncSampler")["inputs"]
    planner = next(k for k, n in output.items() if n["class_type"] == "WindowPlanner")
    sync = next(k for k, n in output.items() if n["class_type"] == "AnchorSync")
    assert sampler["plan"] == [planner, 0] and sampler["sync"] == [sync, 0]
