"""How many of the native MODEL's layers still go through ComfyUI's per-call ``cast_bias_weight`` in one
step, with ComfyUI's unet dtype choice as a CUDA GPU makes it, run on a CPU (issue 22: SD1.5's eager
step measured 2.8x core bf16 on an H200 while its graphed step tied: host work, and casts were a suspect).

ComfyUI 0.33 picks fp16 for an SD1.5 layout on a GPU that runs fp16 (its supported dtypes list fp16
first), whatever the file's dtype; here ``unet_dtype`` and ``unet_manual_cast`` are set to what such a GPU
gives (``--dtype``, no manual cast) and the tiny SD1.5 of ``bench_comfy_native.py --tiny`` is loaded through
the pack's loader and through core's (bf16), then one ``apply_model`` step counts the calls.

    COMFYUI_PATH=... python3 benchmarks/comfy_cast_count.py [--dtype fp16|bf16]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import bench_comfy_native as B  # noqa: E402


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="the unet dtype a GPU would pick")
    args = ap.parse_args()
    native = B.import_comfy(torch.device("cpu"))
    import comfy.model_management as mm
    import comfy.ops
    import comfy.sd
    import comfy.utils

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    mm.unet_dtype = lambda *a, **k: dtype          # as on a GPU that computes in it
    mm.unet_manual_cast = lambda *a, **k: None     # ... natively, with no manual cast
    dense, packed = B.sd_weights(B.TINY_SD, torch.device("cpu"), 0)
    calls = [0]
    cast = comfy.ops.cast_bias_weight

    def counting(*a, **k):
        calls[0] += 1
        return cast(*a, **k)

    comfy.ops.cast_bias_weight = counting
    out = {"file_dtype": str(comfy.utils.weight_dtype(packed)), "gpu_unet_dtype": args.dtype}
    for name, load in (("bonsai", lambda: native.load_native_model(dict(packed), "cast count")),
                       ("core bf16", lambda: comfy.sd.load_diffusion_model_state_dict(
                           dict(dense), model_options={"dtype": torch.bfloat16}))):
        model = load().model
        flagged = [n for n, m in model.diffusion_model.named_modules() if getattr(m, "comfy_cast_weights", False)]
        packed_n = sum(native.is_q1(getattr(m, "weight", None)) for m in model.diffusion_model.modules())
        x, c = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 768, dtype=model.get_dtype())
        calls[0] = 0
        with torch.inference_mode():
            model.apply_model(x, torch.full((2,), 1.0), c_crossattn=c)
        out[name] = {"compute_dtype": str(model.get_dtype()), "layers_flagged_casting": len(flagged),
                     "packed_layers": packed_n, "cast_bias_weight_calls_per_step": calls[0]}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
