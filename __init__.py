"""ControlSync: coherent images far larger than the model, following a ControlNet condition of any size.

Registers the nodes with ComfyUI (V3 extension) and puts the shipped workflows' images into ComfyUI's
input folder (never overwriting: nodes/example_images.py). ComfyUI is imported only when ComfyUI asks
for the nodes, so `sampling/` stays importable on its own.
"""
WEB_DIRECTORY = "./nodes/web"


async def comfy_entrypoint():
    import folder_paths
    from comfy_api.latest import ComfyExtension

    from .nodes import NODES
    from .nodes.example_images import copy_example_images

    copy_example_images(folder_paths.get_input_directory())

    class ControlSyncExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    return ControlSyncExtension()
