"""Run by tests/test_comfy_text_encoder.py with ComfyUI's own Python: load a Bonsai 4-bit text encoder
through the pack's Bonsai Text Encoder Loader inside a real ComfyUI (imported, on the CPU), encode a
prompt with ComfyUI's CLIP, and save the conditioning and the token ids ComfyUI used.

    python tests/comfy_te_check.py COMFYUI_PATH PACK_DIR MODEL_DIR OUT.safetensors
"""

import importlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path

comfy_path, pack_dir, model_dir, out = sys.argv[1:5]
os.environ["CUDA_VISIBLE_DEVICES"] = ""
sys.path.insert(0, comfy_path)
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
if importlib.util.find_spec("torchaudio") is None:
    # comfy.sd imports torchaudio for its audio VAE (unused here); this venv has none: an empty stand-in
    import importlib.machinery
    import types

    for name in ("torchaudio", "torchaudio.functional", "torchaudio.transforms"):
        stub = types.ModuleType(name)
        stub.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=name == "torchaudio")
        stub.__path__ = []
        sys.modules[name] = stub
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

# the pack as ComfyUI imports it: a package named by its folder (a link here)
parent = Path(tempfile.mkdtemp())
(parent / "ComfyUI_Bonsai").symlink_to(Path(pack_dir).resolve(), target_is_directory=True)
sys.path.insert(0, str(parent))
pack = importlib.import_module("ComfyUI_Bonsai")
node = pack.NODE_CLASS_MAPPINGS["BonsaiTextEncoderLoader"]()
from ComfyUI_Bonsai.nodes.loader import PATH_CHOICE  # noqa: E402

with torch.inference_mode():  # as ComfyUI runs every node
    (clip,) = node.load(PATH_CHOICE, path=model_dir)
    tokens = clip.tokenize("a red lantern in the snow")
    cond = clip.encode_from_tokens(tokens)
ids = torch.tensor([[t[0] for t in row] for row in tokens["qwen3_4b"]])
kinds = sorted({type(m.weight).__name__ for m in clip.cond_stage_model.modules()
                if isinstance(getattr(m, "weight", None), torch.Tensor)})
print("weight types:", kinds)
save_file({"cond": cond.float().contiguous(), "ids": ids.contiguous()}, out)
print("OK", tuple(cond.shape))
