"""ComfyUI entry point of ComfyUI-Bonsai: the node mappings, nothing else.

ComfyUI imports this folder as a package under its own folder name, so imports here are
relative. Outside ComfyUI (pytest, pip-installed ``bonsai_core``) this file is not needed.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS


__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
