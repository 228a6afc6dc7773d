"""ComfyUI entry point of ComfyUI-Bonsai: the node mappings and the web folder (help pages).

ComfyUI imports this folder as a package under its own folder name, so imports here are
relative. Outside ComfyUI (pytest, pip-installed ``bonsai_core``) this file is not needed.
"""

if __package__:  # imported as a package: ComfyUI, or anything that loads the folder by name
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # loaded as a lone module (pytest collecting a checkout whose folder name is not an identifier)
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

WEB_DIRECTORY = "./web"  # web/docs/<NodeId>.md: the help page ComfyUI's frontend shows for each node

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
