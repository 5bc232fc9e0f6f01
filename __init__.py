"""ControlSync: coherent images far larger than the model, following a ControlNet condition of any size."""
from comfy_api.latest import ComfyExtension

WEB_DIRECTORY = "./nodes/web"


class ControlSyncExtension(ComfyExtension):
    async def get_node_list(self):
        from .nodes import NODES
        return list(NODES)


async def comfy_entrypoint() -> ComfyExtension:
    return ControlSyncExtension()
