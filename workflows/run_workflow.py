#!/usr/bin/env python3
"""Run a ComfyUI workflow saved from the UI (File > Save) on a running ComfyUI server, headless.

    python workflows/run_workflow.py workflows/controlsync_panorama.json \\
        --server http://127.0.0.1:8188 --out results \\
        --set "ControlSync Sampler.steps=30" --set 7.stride=128 --image my_canny.png

What it does:
  1. reads the server's node definitions (GET /object_info) and converts the UI-format workflow into
     the API format that POST /prompt takes (the conversion the UI does when you press Queue);
  2. applies the --set overrides: NODE.input=value, NODE being a node id, its title, its display
     name or its type (it must name exactly one node);
  3. uploads images (POST /upload/image): --image PATH (or NODE=PATH) for the workflow's Load Image
     node, and any Load Image file the server lacks but that sits next to the workflow file;
  4. queues the prompt, waits for it (GET /history), downloads every saved image (GET /view) into
     --out and prints the paths, one a line.
Exits non-zero with the server's message when the prompt is refused, a node fails, or time runs out.
Standard library only: any Python 3.8+ runs it.
"""
from __future__ import annotations

import argparse
import copy
import json
import mimetypes
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize", "increment-wrap"}
LEGACY_SEED_NAMES = {"seed", "noise_seed"}  # old frontends add a control widget after these by name
UPLOAD_OPTIONS = ("image_upload", "video_upload", "animated_image_upload", "audio_upload", "mesh_upload", "file_upload")
# Frontend-only nodes: never sent to the server.
VIRTUAL_SKIPPED = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode", "Label (rgthree)", "Fast Groups Bypasser (rgthree)"}
MODE_MUTED, MODE_BYPASSED = 2, 4


class WorkflowError(Exception):
    """A problem with the workflow or its run, reported to the user without a traceback."""


# --------------------------------------------------------------------------------------------- HTTP

class Server:
    def __init__(self, url: str, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def _open(self, req):
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                detail = json.loads(body)
            except ValueError:
                detail = body.decode("utf-8", "replace")
            raise HTTPFailure(e.code, detail) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
            raise WorkflowError(f"cannot reach the ComfyUI server at {self.url}: {getattr(e, 'reason', e)}") from None

    def get_json(self, path: str):
        return json.loads(self._open(urllib.request.Request(self.url + path)))

    def get_bytes(self, path: str) -> bytes:
        return self._open(urllib.request.Request(self.url + path))

    def post_json(self, path: str, payload):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        return json.loads(self._open(req) or b"{}")

    def upload_image(self, path: str, name: str | None = None) -> str:
        """Upload a file into the server's input folder; returns the name LoadImage takes."""
        name = name or os.path.basename(path)
        boundary = uuid.uuid4().hex
        with open(path, "rb") as fh:
            data = fh.read()
        ctype = mimetypes.guess_type(name)[0] or "application/octet-stream"
        parts = []
        for field, value in (("overwrite", "true"), ("type", "input"), ("subfolder", "")):
            parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"\r\n\r\n{value}\r\n'.encode())
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                     f"Content-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n")
        parts.append(f"--{boundary}--\r\n".encode())
        req = urllib.request.Request(self.url + "/upload/image", data=b"".join(parts), method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        try:
            info = json.loads(self._open(req))
        except HTTPFailure as e:
            raise WorkflowError(f"uploading {path} failed: HTTP {e.code} {e.detail}") from None
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]


class HTTPFailure(Exception):
    def __init__(self, code, detail):
        super().__init__(f"HTTP {code}: {detail}")
        self.code, self.detail = code, detail


# ------------------------------------------------------------------------------ UI -> API conversion

def _ordered_inputs(info: dict):
    """[(name, spec, section)] in definition order: required, then optional (hidden inputs are not sent)."""
    out = []
    order = info.get("input_order") or {}
    for section in ("required", "optional"):
        specs = info.get("input", {}).get(section) or {}
        names = order.get(section) or list(specs)
        out += [(n, specs[n], section) for n in names if n in specs]
    return out


def _input_type(spec):
    t = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    return "COMBO" if isinstance(t, (list, tuple)) else t


def _input_options(spec) -> dict:
    return spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}


def _is_widget(spec) -> bool:
    return _input_type(spec) in WIDGET_TYPES and not _input_options(spec).get("forceInput")


def _widget_slots(info: dict):
    """The frontend's widget list for a node: [(input name or None for a frontend-only widget, kind)].

    kind is "value", "control" (control_after_generate: the seed's fixed/randomize/... widget) or
    "upload" (the upload button the frontend adds after the required inputs of a Load Image-like node).
    """
    slots = []
    upload = False
    for name, spec, section in _ordered_inputs(info):
        if section == "optional" and upload:
            slots.append((None, "upload"))
            upload = False
        if not _is_widget(spec):
            continue
        opts = _input_options(spec)
        slots.append((name, "value"))
        if opts.get("control_after_generate") or (_input_type(spec) == "INT" and name in LEGACY_SEED_NAMES):
            slots.append((None, "control"))
        if any(opts.get(k) for k in UPLOAD_OPTIONS):
            upload = True
    if upload:
        slots.append((None, "upload"))
    return slots


def map_widgets(node: dict, info: dict) -> dict:
    """{input name: (value, index in widgets_values)} for a node's widget values."""
    values = node.get("widgets_values")
    if values is None:
        return {}
    if isinstance(values, dict):  # some custom nodes save widgets by name
        return {k: (v, k) for k, v in values.items()}
    out = {}
    i = 0
    control_flag = False
    specs = {n: sp for n, sp, _ in _ordered_inputs(info)}
    for name, kind in _widget_slots(info):
        if name is not None:
            control_flag = _input_options(specs[name]).get("control_after_generate") is True
        if i >= len(values):
            break
        value = values[i]
        if kind == "control":
            # a frontend-only widget: skip it ("fixed", "randomize", ...; the first UIs saved a boolean)
            if (isinstance(value, str) and value in CONTROL_VALUES) or (isinstance(value, bool) and control_flag):
                i += 1
            continue
        if kind == "upload":
            if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
                i += 1  # the upload button's placeholder value ("image", null)
            continue
        out[name] = (value, i)
        i += 1
    return out


def _default(spec):
    opts = _input_options(spec)
    if "default" in opts:
        return opts["default"]
    if _input_type(spec) == "COMBO":
        choices = spec[0] if isinstance(spec[0], (list, tuple)) else opts.get("options") or []
        return choices[0] if choices else None
    return None


def _fits(value, spec) -> bool:
    """Whether a widget value has the type its input takes (a mismatch means the node changed since saving)."""
    kind = _input_type(spec)
    if kind == "INT":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "FLOAT":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "BOOLEAN":
        return isinstance(value, bool)
    if kind == "STRING":
        return isinstance(value, str)
    return True


def _links_by_id(workflow: dict) -> dict:
    links = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link.get("type"))
        else:
            links[link[0]] = tuple(link[1:6])
    return links


def node_label(node: dict, object_info: dict) -> str:
    display = (object_info.get(node["type"]) or {}).get("display_name") or node["type"]
    return f"#{node['id']} {node.get('title') or display}"


def convert(workflow: dict, object_info: dict, keep_previews: bool = True, warn=None):
    """UI-format workflow -> (API prompt, {node id: {input: widgets_values index}}).

    Widget values are matched to the server's widget inputs in definition order (required, then
    optional), skipping the frontend-only widgets (the seed's control_after_generate value, the
    upload button); a linked input takes its link, followed through reroutes and bypassed nodes,
    or a Primitive node's value; muted/bypassed nodes and notes are left out. A widget the saved
    workflow has no value for gets the input's default, as in the UI.
    """
    warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr))
    if "nodes" not in workflow:
        if all(isinstance(v, dict) and "class_type" in v for v in workflow.values()):
            return copy.deepcopy(workflow), {}  # already in API format
        raise WorkflowError("this is neither a UI-format workflow (no 'nodes') nor an API-format prompt")
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise WorkflowError("the workflow contains subgraphs: open it in ComfyUI, unpack them (right click > "
                            "Unpack Subgraph), save, and run that file")
    nodes = {str(n["id"]): n for n in workflow["nodes"]}
    links = _links_by_id(workflow)
    group_nodes = (workflow.get("extra") or {}).get("groupNodes") or {}

    def resolve(link_id, seen=()):
        """A link -> ("link", [origin id, slot]) | ("value", v) | None (source removed)."""
        if link_id is None or link_id not in links:
            return None
        origin_id, origin_slot = str(links[link_id][0]), links[link_id][1]
        origin = nodes.get(origin_id)
        if origin is None or origin_id in seen:
            return None
        seen = seen + (origin_id,)
        mode = origin.get("mode", 0)
        if origin["type"] == "Reroute" or mode == MODE_BYPASSED:
            inputs = origin.get("inputs") or []
            if origin["type"] == "Reroute":
                candidates = inputs[:1]
            else:  # a bypassed node passes on the input of the output's type (same slot first)
                outputs = origin.get("outputs") or []
                otype = outputs[origin_slot].get("type") if origin_slot < len(outputs) else None
                ordered = ([inputs[origin_slot]] if origin_slot < len(inputs) else []) + inputs
                candidates = [i for i in ordered if i.get("type") == otype and i.get("link") is not None][:1]
            return resolve(candidates[0].get("link"), seen) if candidates else None
        if mode == MODE_MUTED:
            return None
        if origin["type"] == "PrimitiveNode":
            values = origin.get("widgets_values") or []
            return ("value", values[0]) if values else None
        return ("link", [origin_id, origin_slot])

    prompt, widget_index = {}, {}
    for node_id, node in nodes.items():
        ntype = node["type"]
        if node.get("mode", 0) in (MODE_MUTED, MODE_BYPASSED) or ntype in VIRTUAL_SKIPPED:
            continue
        if ntype in group_nodes or ntype.startswith("workflow>") or ntype.startswith("workflow/"):
            raise WorkflowError(f"node {node_label(node, object_info)} is a group node: convert it to nodes in the UI first")
        info = object_info.get(ntype)
        if info is None:
            if not node.get("outputs") and not node.get("inputs"):
                continue  # a frontend-only decoration (notes, labels, ...)
            raise WorkflowError(f"node {node_label(node, object_info)}: type '{ntype}' is not installed on this server "
                                "(missing custom node pack, or it failed to import: see the server log)")
        if not keep_previews and ntype == "PreviewImage":
            continue
        widgets = map_widgets(node, info)
        linked = {}
        for inp in node.get("inputs") or []:
            name = (inp.get("widget") or {}).get("name") or inp.get("name")
            if inp.get("link") is not None:
                linked[name] = inp["link"]
        inputs = {}
        for name, spec, _ in _ordered_inputs(info):
            if name in linked:
                source = resolve(linked[name])
                if source is not None:
                    inputs[name] = source[1]
                    continue
            if name in widgets:
                value = widgets[name][0]
                if not _fits(value, spec):
                    warn(f"node {node_label(node, object_info)}: saved value {value!r} does not fit input '{name}' "
                         f"({_input_type(spec)}): was the workflow saved with another version of the node?")
                inputs[name] = value
            elif _is_widget(spec) and _default(spec) is not None:
                inputs[name] = _default(spec)
        prompt[node_id] = {"class_type": ntype, "inputs": inputs,
                           "_meta": {"title": node.get("title") or info.get("display_name") or ntype}}
        widget_index[node_id] = {name: idx for name, (_, idx) in widgets.items()}
    # A node whose input lost its source (muted upstream) is still sent, as the UI does: the server's
    # "required input missing" error then names it.
    return prompt, widget_index


# -------------------------------------------------------------------------------------- overrides

def find_node(ref: str, workflow: dict, object_info: dict, prompt: dict) -> str:
    """A node id for a reference: id, title, display name or type (exact, then case-insensitive)."""
    nodes = workflow.get("nodes")
    if nodes is None:  # API format
        if ref in prompt:
            return ref
        names = {nid: [(v.get("_meta") or {}).get("title"), v["class_type"]] for nid, v in prompt.items()}
    else:
        if any(str(n["id"]) == ref for n in nodes):
            return ref
        names = {str(n["id"]): [n.get("title"), (object_info.get(n["type"]) or {}).get("display_name"), n["type"]]
                 for n in nodes}
    for fold in (False, True):
        norm = (lambda s: s.casefold()) if fold else (lambda s: s)
        for field in range(3):
            hits = [nid for nid, ns in names.items() if len(ns) > field and ns[field] and norm(ns[field]) == norm(ref)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise WorkflowError(f"'{ref}' names several nodes ({', '.join('#' + h for h in hits)}): use a node id")
    raise WorkflowError(f"no node called '{ref}' in the workflow (use a node id, title or type)")


def coerce(value: str, spec):
    kind = _input_type(spec) if spec is not None else None
    try:
        if kind == "INT":
            number = float(value)
            if not number.is_integer():
                raise ValueError(value)
            return int(value) if value.strip().lstrip("+-").isdigit() else int(number)
        if kind == "FLOAT":
            return float(value)
        if kind == "BOOLEAN":
            low = value.strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
    except ValueError:
        raise WorkflowError(f"'{value}' is not a valid {kind}") from None
    if kind in ("STRING", "COMBO"):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def apply_override(text: str, workflow, object_info, prompt, widget_index, ui_copy) -> None:
    key, sep, value = text.partition("=")
    ref, dot, name = key.rpartition(".")
    if not sep or not dot or not ref or not name:
        raise WorkflowError(f"--set {text!r}: expected NODE.input=value (NODE: id, title or type)")
    node_id = find_node(ref, workflow, object_info, prompt)
    if node_id not in prompt:
        raise WorkflowError(f"--set {text!r}: node #{node_id} is not part of the run (muted, bypassed or virtual)")
    ntype = prompt[node_id]["class_type"]
    specs = {n: s for n, s, _ in _ordered_inputs(object_info.get(ntype, {}))}
    if name not in specs:
        raise WorkflowError(f"--set {text!r}: {ntype} has no input '{name}' (inputs: {', '.join(specs) or 'none'})")
    prompt[node_id]["inputs"][name] = coerce(value, specs[name])
    idx = widget_index.get(node_id, {}).get(name)
    if idx is not None and ui_copy is not None:
        for n in ui_copy.get("nodes", []):
            if str(n["id"]) == node_id:
                n["widgets_values"][idx] = prompt[node_id]["inputs"][name]


def image_loaders(prompt: dict, object_info: dict):
    """[(node id, input name)] of every input that takes an uploaded image."""
    out = []
    for nid, node in prompt.items():
        for name, spec, _ in _ordered_inputs(object_info.get(node["class_type"], {})):
            if _input_options(spec).get("image_upload"):
                out.append((nid, name))
    return out


def set_image(server, ref_and_path: str, workflow, object_info, prompt, widget_index, ui_copy):
    """Upload an image for the (only, or the named) image loader; returns (node id, input name)."""
    ref, sep, path = ref_and_path.partition("=")
    if not sep or os.path.exists(ref_and_path):
        ref, path = None, ref_and_path
    if not os.path.isfile(path):
        raise WorkflowError(f"--image: no such file: {path}")
    loaders = image_loaders(prompt, object_info)
    if ref is not None:
        nid = find_node(ref, workflow, object_info, prompt)
        loaders = [(n, i) for n, i in loaders if n == nid]
        if not loaders:
            raise WorkflowError(f"--image {ref_and_path!r}: node #{nid} does not load images")
    if len(loaders) != 1:
        which = ", ".join(f"#{n}" for n, _ in loaders) or "none"
        raise WorkflowError(f"--image: the workflow has {len(loaders)} image loaders ({which}); use --image NODE=PATH")
    nid, name = loaders[0]
    uploaded = server.upload_image(path)
    apply_override(f"{nid}.{name}={uploaded}", workflow, object_info, prompt, widget_index, ui_copy)
    return nid, name


def upload_missing_inputs(server, workflow_path, prompt, object_info, explicitly_set) -> None:
    """Upload Load Image files the server lacks when the file sits next to the workflow (shipped examples)."""
    here = os.path.dirname(os.path.abspath(workflow_path))
    for nid, name in image_loaders(prompt, object_info):
        if (nid, name) in explicitly_set:
            continue
        value = prompt[nid]["inputs"].get(name)
        if not isinstance(value, str):
            continue
        spec = object_info[prompt[nid]["class_type"]]["input"]
        options = dict(spec.get("required") or {}, **(spec.get("optional") or {}))[name]
        choices = options[0] if isinstance(options[0], list) else _input_options(options).get("options", [])
        local = os.path.join(here, value)
        if value not in choices and os.path.isfile(local):
            prompt[nid]["inputs"][name] = server.upload_image(local)
            print(f"uploaded {local} for node #{nid}", file=sys.stderr)


# ---------------------------------------------------------------------------------------- running

def format_node_errors(body, prompt) -> str:
    lines = []
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            lines.append(f"{err.get('message', '')}: {err.get('details', '')}".strip(": "))
        elif err:
            lines.append(str(err))
        for nid, info in (body.get("node_errors") or {}).items():
            title = (prompt.get(nid, {}).get("_meta") or {}).get("title") or info.get("class_type", "")
            for e in info.get("errors", []):
                lines.append(f"  node #{nid} {title} ({info.get('class_type', '')}): {e.get('message', '')}"
                             f"{': ' + str(e.get('details')) if e.get('details') else ''}")
    else:
        lines.append(str(body))
    return "\n".join(lines) or "unknown error"


def wait_for(server, prompt_id: str, timeout: float, poll: float = 0.5) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        history = server.get_json(f"/history/{urllib.parse.quote(prompt_id)}")
        entry = history.get(prompt_id)
        status = (entry or {}).get("status") or {}
        if entry is not None and (status.get("completed") or status.get("status_str") in ("success", "error")
                                  or not status):
            return entry
        if time.monotonic() > deadline:
            try:
                server.post_json("/interrupt", {})
            except (WorkflowError, HTTPFailure):
                pass
            raise WorkflowError(f"timed out after {timeout:.0f}s waiting for prompt {prompt_id} (interrupted it)")
        time.sleep(poll)


def execution_error(entry: dict, verbose: bool = False) -> str | None:
    status = entry.get("status") or {}
    if status.get("status_str") != "error":
        return None
    for event, data in status.get("messages") or []:
        if event == "execution_error":
            tb = "".join(data.get("traceback") or [])
            message = (f"node #{data.get('node_id')} ({data.get('node_type')}) failed: "
                       f"{data.get('exception_type', '')}: {data.get('exception_message', '')}".rstrip())
            if tb:
                message += f"\nserver traceback:\n{tb}" if verbose else "\n(--verbose shows the server's traceback)"
            return message
        if event == "execution_interrupted":
            return f"execution was interrupted at node #{data.get('node_id')} ({data.get('node_type')})"
    return "execution failed (no details from the server)"


def download_outputs(server, entry: dict, out_dir: str, include_temp: bool) -> list:
    os.makedirs(out_dir, exist_ok=True)
    saved = []
    for node_id, outputs in (entry.get("outputs") or {}).items():
        for item in outputs.get("images") or []:
            if item.get("type") != "output" and not include_temp:
                continue
            query = urllib.parse.urlencode({"filename": item["filename"], "subfolder": item.get("subfolder", ""),
                                            "type": item.get("type", "output")})
            data = server.get_bytes(f"/view?{query}")
            name = os.path.basename(item["filename"])
            if item.get("type") != "output":
                name = f"{item.get('type')}_{node_id}_{name}"
            path = os.path.join(out_dir, name)
            with open(path, "wb") as fh:
                fh.write(data)
            saved.append(path)
    return saved


def run(args) -> int:
    with open(args.workflow, encoding="utf-8") as fh:
        workflow = json.load(fh)
    server = Server(args.server)
    object_info = server.get_json("/object_info")
    prompt, widget_index = convert(workflow, object_info, keep_previews=not args.no_previews)
    ui_copy = copy.deepcopy(workflow) if "nodes" in workflow else None
    for text in args.set or []:
        apply_override(text, workflow, object_info, prompt, widget_index, ui_copy)
    explicitly_set = {set_image(server, spec, workflow, object_info, prompt, widget_index, ui_copy)
                      for spec in args.image or []}
    upload_missing_inputs(server, args.workflow, prompt, object_info, explicitly_set)
    if args.dump_api:
        with open(args.dump_api, "w", encoding="utf-8") as fh:
            json.dump(prompt, fh, indent=1)

    client_id = uuid.uuid4().hex
    extra = {"extra_pnginfo": {"workflow": ui_copy}} if ui_copy is not None else {}
    try:
        queued = server.post_json("/prompt", {"prompt": prompt, "client_id": client_id, "extra_data": extra})
    except HTTPFailure as e:
        raise WorkflowError("the server refused the prompt:\n" + format_node_errors(e.detail, prompt)) from None
    if queued.get("node_errors"):
        raise WorkflowError("the server refused the prompt:\n" + format_node_errors(queued, prompt))
    prompt_id = queued["prompt_id"]
    print(f"queued prompt {prompt_id} on {server.url}", file=sys.stderr)
    t0 = time.monotonic()
    entry = wait_for(server, prompt_id, args.timeout)
    error = execution_error(entry, verbose=args.verbose)
    if error:
        raise WorkflowError(error)
    saved = download_outputs(server, entry, args.out, include_temp=args.previews)
    print(f"done in {time.monotonic() - t0:.1f}s: {len(saved)} image(s)", file=sys.stderr)
    if not saved:
        raise WorkflowError("the run finished but saved no images (does the workflow have a Save Image node?)")
    for path in saved:
        print(path)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workflow", help="workflow JSON saved from the ComfyUI UI (API-format prompts work too)")
    ap.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI server URL (default %(default)s)")
    ap.add_argument("--out", default="output", help="folder for the downloaded images (default %(default)s)")
    ap.add_argument("--set", action="append", metavar="NODE.input=value",
                    help="override an input; NODE is a node id, title, display name or type. Repeatable.")
    ap.add_argument("--image", action="append", metavar="[NODE=]PATH",
                    help="upload PATH and use it in the workflow's (only, or NODE's) Load Image. Repeatable.")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the run (default %(default)s)")
    ap.add_argument("--previews", action="store_true", help="also download Preview Image outputs")
    ap.add_argument("--no-previews", action="store_true", help="drop Preview Image nodes from the run")
    ap.add_argument("--dump-api", metavar="PATH", help="also write the API-format prompt to PATH")
    ap.add_argument("--verbose", action="store_true", help="show the server's traceback when a node fails")
    args = ap.parse_args(argv)
    try:
        return run(args)
    except WorkflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except HTTPFailure as e:
        print(f"error: the server answered {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
