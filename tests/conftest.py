"""Test session setup: the pure `sampling` package always; a real ComfyUI host for everything else.

Under CI (CI=true) a missing host fails the run instead of skipping the host-backed tests.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

from comfy_host import find_host, host_version, import_host, old_host  # noqa: E402

HOST = find_host()

# README's command runs two pytest-xdist workers on the two cores; each computes on one thread (torch's second
# thread buys ~5% on these small models, a second worker nearly doubles the throughput). The servers the
# end-to-end tests start inherit the setting.
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_report_header(config):
    if HOST is None:
        return "ComfyUI host: NONE FOUND (set COMFYUI_PATH or run ../shared/tools/setup_comfyui_host.sh)"
    old = old_host()
    return [f"ComfyUI host: {HOST} version {host_version(HOST)}",
            f"older ComfyUI host (end-to-end tests): {old} version {host_version(old)}" if old else
            "older ComfyUI host (end-to-end tests): none found (set COMFYUI_OLD_PATH)"]


@pytest.fixture(scope="session")
def comfy():
    """The imported pack (`controlsync`) inside the real ComfyUI host."""
    if HOST is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("no ComfyUI host found under CI: .ci/run must build one (setup_comfyui_host.sh)")
        pytest.skip("no ComfyUI host found (set COMFYUI_PATH or build ~/comfy with setup_comfyui_host.sh)")
    return import_host(HOST)
