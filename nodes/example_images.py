"""The images the shipped workflows load, put where ComfyUI's Load Image finds them.

A workflow opened from the template browser (ComfyUI lists this pack's `workflows/` folder there) names
its condition image by file name, and Load Image reads only ComfyUI's input folder. So when ComfyUI
loads the pack, each image of `workflows/` that the input folder lacks is copied there, once; a file of
the same name already there - the user's own or an earlier copy, edited or not - is never overwritten.
The names carry the pack's prefix (`controlsync_...`) so they do not collide with users' files.
"""
from __future__ import annotations

import logging
import os

WORKFLOWS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def copy_example_images(input_dir: str, source: str = WORKFLOWS_DIR) -> list[str]:
    """Copy the images of `source` missing from `input_dir` into it; returns the names copied."""
    copied = []
    for name in sorted(os.listdir(source)):
        if not name.lower().endswith(IMAGE_SUFFIXES):
            continue
        try:
            os.makedirs(input_dir, exist_ok=True)
            with open(os.path.join(source, name), "rb") as src, open(os.path.join(input_dir, name), "xb") as dst:
                dst.write(src.read())  # "x": fails rather than overwrite, even if another process just wrote it
            copied.append(name)
        except FileExistsError:
            continue
        except OSError as e:  # a read-only input folder must not stop the nodes from loading
            logging.warning("ControlSync: could not copy the example image %s into %s: %s", name, input_dir, e)
    return copied
