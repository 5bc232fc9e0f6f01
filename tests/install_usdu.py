"""Install Ultimate SD Upscale as a second custom node for the upscale benchmark only (never a runtime
dependency, never committed): ssitu/ComfyUI_UltimateSDUpscale at a pinned commit, with the submodule it
references (Coyote-A/ultimate-upscale-for-automatic1111, the A1111 script it wraps) at that exact commit.

    python tests/install_usdu.py [--source owner/name=GIT_DIR_OR_URL ...] [--force]

Files are copied out of git (`git archive` of the pinned commit, nothing else) into
tests/.cache/usdu/ComfyUI_UltimateSDUpscale, the submodule into its repositories/ultimate_sd_upscale - so
the node's __init__ finds the script and never downloads it. Sources, first found: --source, this project's
read-only mirrors (/work/.mirror/<owner>+<name>/repo), then a bare clone of https://github.com/<owner>/<name>
into tests/.cache/usdu/src. The submodule pin is checked against the parent commit's tree. A stamp file
records what was installed; a second run with the same pins does nothing.

Use it from a benchmark server (put the folder in a `custom_nodes:` folder of extra_model_paths.yaml, as
tests/test_e2e_server.py does for the pack) or in-process (`load_in_process`, after comfy_host.import_host).
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

PARENT = ("ssitu/ComfyUI_UltimateSDUpscale", "34a3c2c0d8a0321d4f9a355092f105046e56d998")  # v1.7.1, 2026-02-27
SCRIPT = ("Coyote-A/ultimate-upscale-for-automatic1111", "2322caa480535b1011a1f9c18126d85ea444f146")
SUBMODULE_PATH = "repositories/ultimate_sd_upscale"
CACHE = Path(__file__).resolve().parent / ".cache" / "usdu"
NODE_DIR = CACHE / "ComfyUI_UltimateSDUpscale"
STAMP = NODE_DIR / ".controlsync-install.json"
MIRRORS = Path("/work/.mirror")
# the nodes the benchmark uses (usdu_nodes.py at the pinned commit)
NODE_TYPES = ("UltimateSDUpscale", "UltimateSDUpscaleNoUpscale", "UltimateSDUpscaleCustomSample")


def git(*args: str, input: bytes | None = None) -> bytes:
    return subprocess.run(["git", *args], check=True, capture_output=True, input=input).stdout


def git_dir(repo: str, commit: str, sources: dict[str, str]) -> str:
    """A git directory holding `commit` of `repo` (owner/name)."""
    candidates = [sources[repo]] if repo in sources else []
    candidates.append(str(MIRRORS / repo.replace("/", "+") / "repo"))
    clone = CACHE / "src" / repo.replace("/", "+")
    candidates.append(str(clone))
    for candidate in candidates:
        if "://" in candidate:  # a URL given with --source: clone it like the default address
            clone = CACHE / "src" / repo.replace("/", "+")
            _clone(candidate, clone)
            candidate = str(clone)
        if Path(candidate).is_dir() and _has(candidate, commit):
            return candidate
    _clone(f"https://github.com/{repo}.git", clone)
    if not _has(str(clone), commit):
        raise SystemExit(f"{repo}: commit {commit} is not in {clone}; give a source that has it with --source {repo}=PATH")
    return str(clone)


def _has(gitdir: str, commit: str) -> bool:
    try:
        return git("--git-dir", _gitdir(gitdir), "cat-file", "-t", commit).strip() == b"commit"
    except (subprocess.CalledProcessError, FileNotFoundError):
        return False


def _gitdir(path: str) -> str:
    return str(Path(path) / ".git") if (Path(path) / ".git").is_dir() else path


def _clone(url: str, dest: Path) -> None:
    if dest.is_dir():
        git("--git-dir", str(dest), "fetch", "-q", url, "+refs/heads/*:refs/heads/*")
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    git("clone", "-q", "--bare", url, str(dest))


def export(gitdir: str, commit: str, dest: Path) -> None:
    """The files of `commit` (no .git, no submodule contents) written under `dest`."""
    data = git("--git-dir", _gitdir(gitdir), "archive", "--format=tar", commit)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")


def install(sources: dict[str, str] | None = None, force: bool = False) -> Path:
    """Install (once) and return the custom node's folder."""
    stamp = {"parent": PARENT, "submodule": SCRIPT}
    if not force and STAMP.is_file() and json.loads(STAMP.read_text()) == json.loads(json.dumps(stamp)):
        return NODE_DIR
    sources = sources or {}
    parent_dir = git_dir(PARENT[0], PARENT[1], sources)
    entry = git("--git-dir", _gitdir(parent_dir), "ls-tree", PARENT[1], SUBMODULE_PATH).split()
    if len(entry) < 3 or entry[1] != b"commit" or entry[2].decode() != SCRIPT[1]:
        raise SystemExit(f"{PARENT[0]}@{PARENT[1][:7]} references {SUBMODULE_PATH} at {entry[2:3]}, not the pinned "
                         f"{SCRIPT[1]}: update the pins together")
    script_dir = git_dir(SCRIPT[0], SCRIPT[1], sources)
    staging = NODE_DIR.with_name(NODE_DIR.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    export(parent_dir, PARENT[1], staging)
    export(script_dir, SCRIPT[1], staging / SUBMODULE_PATH)
    (staging / STAMP.name).write_text(json.dumps(stamp))
    shutil.rmtree(NODE_DIR, ignore_errors=True)
    staging.rename(NODE_DIR)
    return NODE_DIR


def load_in_process(node_dir: Path = NODE_DIR) -> dict:
    """Register the installed node in an in-process ComfyUI (comfy_host.import_host first) the way ComfyUI loads
    custom nodes; returns the benchmark's node classes by type. Call them under torch.inference_mode(), as
    ComfyUI's executor does (USDU turns decoded tensors into PIL images without detaching them)."""
    import asyncio
    import inspect

    import nodes  # ComfyUI's nodes.py
    if not all(t in nodes.NODE_CLASS_MAPPINGS for t in NODE_TYPES):
        loaded = nodes.load_custom_node(str(node_dir))
        if inspect.isawaitable(loaded):
            loaded = asyncio.run(loaded)
        if not loaded:
            raise RuntimeError(f"ComfyUI could not load {node_dir} (see its log)")
    return {t: nodes.NODE_CLASS_MAPPINGS[t] for t in NODE_TYPES}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", action="append", default=[], metavar="OWNER/NAME=GIT_DIR_OR_URL",
                        help="where to take a repository's pinned commit from (repeatable)")
    parser.add_argument("--force", action="store_true", help="reinstall even if the same pins are installed")
    args = parser.parse_args(argv)
    sources = dict(s.split("=", 1) for s in args.source)
    print(install(sources, args.force))


if __name__ == "__main__":
    main(sys.argv[1:])
