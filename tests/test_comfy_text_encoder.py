"""Bonsai Text Encoder Loader inside a real ComfyUI with FLUX.2 [klein] (0.33.0): its CLIP's conditioning
for a prompt equals transformers' Qwen3 on the same 4-bit weights (hidden states side by side).

Skipped unless ``COMFYUI_PATH`` names a ComfyUI that has klein text encoding (``COMFYUI_PYTHON``: its
interpreter). The tiny Qwen3 is built here (vocabulary of the real tokenizer, 64 wide, 3 layers), its
linears and embedding made 4-bit, written as a Bonsai text encoder; ComfyUI's own tokenizer and
Qwen3 code run it through the node's layer classes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
COMFYUI = os.environ.get("COMFYUI_PATH")
HAS_KLEIN = bool(COMFYUI) and "KleinTokenizer" in (Path(COMFYUI) / "comfy" / "text_encoders" / "flux.py").read_text() \
    if COMFYUI and (Path(COMFYUI) / "comfy" / "text_encoders" / "flux.py").is_file() else False
pytestmark = pytest.mark.skipif(not HAS_KLEIN, reason="set COMFYUI_PATH to a ComfyUI with FLUX.2 klein (0.33.0)")

CONFIG = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": 16, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
          "rope_theta": 1000000.0, "attention_bias": False, "tie_word_embeddings": True}
LAYERS = [1, 2, 3]


def _write_model(root: Path) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from bonsai_core import checkpoint
    from bonsai_core.quant.layers import quantize_model
    from bonsai_core.quant.policy import text_encoder_policy
    from bonsai_core.quant.tensor import Q4Tensor

    torch.manual_seed(0)
    te = Qwen3ForCausalLM(Qwen3Config(**CONFIG)).eval()
    with torch.no_grad():
        for n, p in te.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    quantize_model(te, text_encoder_policy())
    emb = te.model.embed_tokens
    emb.weight = torch.nn.Parameter(Q4Tensor.from_float(emb.weight.detach(), torch.float32), requires_grad=False)
    te.tie_weights()
    model = root / "klein-te4"
    tensors, reasons = checkpoint.model_tensors(te)
    checkpoint.save_tensors(model / "text_encoder" / checkpoint.TE_WEIGHTS_NAME, tensors, family="flux2_klein",
                            component="text_encoder", policy=text_encoder_policy().to_dict(), reasons=reasons,
                            tied=checkpoint.tied_names(te))
    (model / "text_encoder" / "config.json").write_text(json.dumps(CONFIG))
    (model / "bonsai.json").write_text(json.dumps({"text_encoder_out_layers": LAYERS}))
    return model


def test_the_loader_gives_comfyui_a_clip_that_computes_the_4bit_qwen3(tmp_path):
    from safetensors.torch import load_file

    from bonsai_core.loader import read_text_encoder
    from bonsai_core.quant.tensor import PackedTensor

    model = _write_model(tmp_path)
    out = tmp_path / "cond.safetensors"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    proc = subprocess.run([python, str(ROOT / "tests" / "comfy_te_check.py"), COMFYUI, str(ROOT), str(model), str(out)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Q4Tensor" in proc.stdout  # ComfyUI's modules hold the packed weights themselves
    got = load_file(str(out))
    cond, ids = got["cond"], got["ids"]
    assert cond.shape[-1] == 3 * CONFIG["hidden_size"]

    # truth: transformers' Qwen3 holding the same weights (dequantized), on the same token ids
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config, tensors, layers = read_text_encoder(model)
    assert list(layers) == LAYERS
    dense = {k: (t.dequantize(torch.float32) if isinstance(t, PackedTensor) else t.float()) for k, t in tensors.items()}
    ref = Qwen3ForCausalLM(Qwen3Config(**config)).eval()
    ref.load_state_dict(dense, strict=True)
    real = int((ids[0] != 151643).sum())  # the prompt's own tokens (ComfyUI pads to 512 after them)
    with torch.no_grad():
        hs = ref.model(input_ids=ids[:, :real], output_hidden_states=True).hidden_states
    want = torch.cat([hs[k] for k in LAYERS], dim=-1)
    torch.testing.assert_close(cond[:, :real], want, rtol=2e-3, atol=2e-3)
