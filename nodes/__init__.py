"""ComfyUI node classes: thin adapters over ``bonsai_core`` (inputs in, one engine call, outputs out).

The node set (BonsaiLoader, BonsaiSampler, BonsaiGuardrail, BonsaiTextOverlay) arrives with the
nodes issue; until then the pack registers no nodes, and ComfyUI loads it without error.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
