"""ControlSync: coherent images far larger than the model, following a ControlNet condition of any size.

Registers the nodes with ComfyUI (V3 extension). ComfyUI is imported only when ComfyUI asks for
the nodes, so `sampling/` stays importable on its own.
"""
WEB_DIRECTORY = "./nodes/web"


async def comfy_entrypoint():
    from comfy_api.latest import ComfyExtension

    from .nodes import NODES

    class ControlSyncExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    return ControlSyncExtension()
