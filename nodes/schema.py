"""What every node's schema shares: the pack's socket types and search aliases where ComfyUI has them."""
from __future__ import annotations

import dataclasses

from comfy_api.latest import io

# Namespaced socket types: the frontend connects an output only to inputs of the same type name, so a
# pack-specific name keeps other packs' sockets (another "SYNC" or "WINDOW_PLAN") off ours.
WindowPlanType = io.Custom("CONTROLSYNC_WINDOW_PLAN")
SyncType = io.Custom("CONTROLSYNC_SYNC")
GuideType = io.Custom("CONTROLSYNC_GUIDE")

# Newer ComfyUI lets a schema list words the node search also matches (io.Schema.search_aliases);
# 0.3.50 and 0.3.64 have no such field, so the display names carry the main words as well.
SEARCH_ALIASES = "search_aliases" in {f.name for f in dataclasses.fields(io.Schema)}


def schema(*, search_aliases: tuple[str, ...] = (), **fields) -> io.Schema:
    """io.Schema(**fields), with the search aliases where the running ComfyUI supports them."""
    if SEARCH_ALIASES:
        fields["search_aliases"] = list(search_aliases)
    return io.Schema(**fields)
