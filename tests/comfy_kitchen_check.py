"""Run inside a real ComfyUI's Python (``COMFYUI_PATH``): the Bonsai native MODEL in its kitchen form
(1-bit weights as comfy_kitchen tensors of the pack's Q1_0 layout, ``nodes/kitchen_layout.py``), the
form the loader hands ComfyUI when its dynamic VRAM is on. Prints one JSON line of results;
tests/test_comfy_kitchen.py asserts on it.

Dynamic VRAM itself needs CUDA (comfy_aimdo stages into a virtual VRAM range), so this checks on the
CPU what is plain torch in it, with ComfyUI's own functions:

* sizes: ``comfy.model_management.module_size`` (the model's memory estimate) and
  ``comfy.memory_management.vram_aligned_size`` (what ``ModelPatcherDynamic.load`` allocates for a
  layer) against the Q1_0 size computed from the shapes, beside what the same weight would count as
  a plain tensor (the classic ``Q1Tensor`` form) and as fp16;
* staging: every packed layer gathered into one byte buffer by ``cast_to_gathered`` /
  ``interpret_gathered_like`` (as ``cast_modules_with_vbar`` does into pinned memory and VRAM), the
  model then sampling from those views;
* moves: a kitchen layer to cpu, meta and another dtype;
* sampling: core ``comfy.sample`` on the kitchen form, the classic form and ComfyUI's own loader of
  the dequantized weights (the independent truth); a LoRA handed the way the dynamic patcher hands
  it (``weight_lowvram_function``) against the merged weights.

In a ComfyUI without comfy_kitchen (0.3.64) it records why the kitchen form is refused.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bonsai_tests_comfy_native_check", ROOT / "tests" / "comfy_native_check.py")
check = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = check
spec.loader.exec_module(check)  # puts ComfyUI and the repo on the path

import torch  # noqa: E402

RESULTS: dict = {}


def load(pack, sd: dict, form: str):
    os.environ["BONSAI_KITCHEN"] = form
    with torch.inference_mode():
        return pack.nodes.comfy_native.load_native_model(dict(sd), f"tiny ({form})")


def packed_layers(model, is_packed) -> list:
    return [(n, m) for n, m in model.diffusion_model.named_modules() if is_packed(getattr(m, "weight", None))]


def sizes(prefix: str, ours, classic, truth, native: dict, kitchen):
    """What ComfyUI counts, against the Q1_0 size from the shapes (18 bytes a group of 128 per row)."""
    import comfy.memory_management as cmm
    import comfy.model_management as mm

    from bonsai_core.quant.q1_0 import packed_nbytes

    layers = packed_layers(ours.model, kitchen.is_q1)
    sd = ours.model.diffusion_model.state_dict()  # module_size's own source
    counted = sum(sd[n + ".weight"].nbytes for n, _ in layers)
    shapes = [m.weight.shape for _, m in layers]
    RESULTS[f"{prefix}_weight_bytes"] = [counted, sum(packed_nbytes(s[0], s[1:].numel()) for s in shapes),
                                         sum(s.numel() * 2 for s in shapes)]  # ComfyUI's, from shapes, fp16
    classic_layers = dict(packed_layers(classic.model, lambda t: getattr(t, "qtype", None) == "Q1_0"))

    def plain(t):  # what ModelPatcherDynamic.load's setup_param sizes a weight that is not a QuantizedTensor as
        return cmm.vram_aligned_size(cmm.TensorGeometry(shape=t.shape, dtype=t.dtype))

    RESULTS[f"{prefix}_vbar_bytes"] = [
        sum(cmm.vram_aligned_size([m.weight, m.bias]) for _, m in layers),
        sum(-(-packed_nbytes(s[0], s[1:].numel()) // 1024) * 1024 for s in shapes)
        + sum(cmm.vram_aligned_size(m.bias) for _, m in layers),
        sum(plain(classic_layers[n].weight) + cmm.vram_aligned_size(classic_layers[n].bias) for n, _ in layers)]
    RESULTS[f"{prefix}_module_size"] = [mm.module_size(ours.model), mm.module_size(classic.model),
                                        mm.module_size(truth.model)]
    RESULTS[f"{prefix}_model_size"] = ours.model_size()
    RESULTS[f"{prefix}_q1_tensors"] = sum(getattr(t, "qtype", None) == "Q1_0" for t in native.values())
    RESULTS[f"{prefix}_kitchen_params"] = sum(kitchen.is_q1(p) for p in ours.model.parameters())
    RESULTS[f"{prefix}_classic_kitchen_params"] = sum(kitchen.is_q1(p) for p in classic.model.parameters())


def staged_sample(prefix: str, ours, kitchen, sample_args, want, **kwargs):
    """Every packed layer gathered into one byte buffer the way dynamic VRAM stages it, then sampled
    from those views (ComfyUI hands the layers such views)."""
    import comfy.memory_management as cmm
    import comfy.model_management as mm

    layers = packed_layers(ours.model, kitchen.is_q1)
    total = sum(cmm.vram_aligned_size([m.weight, m.bias]) for _, m in layers)
    arena = torch.zeros(total, dtype=torch.uint8)
    offset, originals, inside = 0, [], 0
    with torch.inference_mode():
        for _, m in layers:
            size = cmm.vram_aligned_size([m.weight, m.bias])
            buf = arena[offset:offset + size]
            mm.cast_to_gathered([m.weight, m.bias], buf)
            w, b = cmm.interpret_gathered_like([m.weight, m.bias], buf)
            inside += int(kitchen.is_q1(w) and w._qdata.data_ptr() == buf.data_ptr()
                          and torch.equal(w._qdata, m.weight._qdata) and w.shape == m.weight.shape)
            originals.append((m, m.weight, m.bias))
            m.weight = torch.nn.Parameter(w, requires_grad=False)
            if b is not None:
                m.bias = torch.nn.Parameter(b, requires_grad=False)
            offset += size
    RESULTS[f"{prefix}_staged_layers"] = [inside, len(layers), total]
    try:
        RESULTS[f"{prefix}_staged_rel"] = check.rel(check.sample(ours, *sample_args, **kwargs), want)
    finally:
        for m, w, b in originals:
            m.weight, m.bias = w, b


def moves(pack, kitchen):
    """A kitchen Linear built by the ops (meta, filled from a Q1Tensor) moved about: the tensor stays
    of the layout, the same logical shape and values."""
    from bonsai_core.quant.tensor import Q1Tensor

    q = Q1Tensor.from_float(torch.randn(128, 256, generator=torch.Generator().manual_seed(9)), torch.bfloat16)
    want = q.dequantize(torch.float32)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(10))
    out = {}
    with torch.inference_mode():
        layer = pack.nodes.comfy_native.bonsai_ops(kitchen=True).Linear(256, 128, bias=False, dtype=torch.bfloat16)
        layer.load_state_dict({"weight": q})
        w = layer.weight
        out["cpu_same_object"] = w.to("cpu") is w
        c = w.clone()
        out["clone"] = kitchen.is_q1(c) and c._qdata.data_ptr() != w._qdata.data_ptr() and torch.equal(c._qdata, w._qdata)
        mt = w.to("meta")
        out["meta"] = kitchen.is_q1(mt) and mt.is_meta and mt.shape == w.shape and mt.nbytes == w.nbytes
        layer.to(torch.float32)
        out["module_to_float32"] = kitchen.is_q1(layer.weight) and layer.weight.dtype == torch.float32
        layer.to("cpu")
        out["module_values"] = float((kitchen.view(layer.weight).dequantize(torch.float32) - want).abs().max())
        out["forward_rel"] = check.rel(layer(x), x @ want.t())
        layer.to("meta")
        out["module_to_meta"] = kitchen.is_q1(layer.weight) and layer.weight.is_meta
    RESULTS["moves"] = out


class DynamicLoadStandIn:
    """A stand-in for what ``ModelPatcherDynamic.load`` does with a patched weight (it needs CUDA):
    the patch list goes to the layer as ``weight_lowvram_function = LowVramPatch(key, patches)``."""

    @staticmethod
    def mixin(base):
        class StandIn(base):
            def load(self, *args, **kwargs):
                import comfy.model_patcher
                import comfy.utils

                for key in self.patches:
                    m = comfy.utils.get_attr(self.model, key.rpartition(".")[0])
                    m.weight_lowvram_function = comfy.model_patcher.LowVramPatch(key, self.patches)
                return None

        return StandIn


def lora_case(work: Path, pack, ours, truth_sd: dict, kitchen, sample_args):
    """A LoRA through core LoraLoaderModelOnly on the kitchen MODEL, reaching the layers as the dynamic
    patcher hands it, against the merged weights computed here."""
    import comfy.model_patcher
    import folder_paths
    import nodes as comfy_nodes
    from safetensors.torch import save_file

    layers = packed_layers(ours.model, kitchen.is_q1)[:2]
    g = torch.Generator().manual_seed(11)
    lora, merged = {}, dict(truth_sd)
    for name, m in layers:
        w = truth_sd[name + ".weight"]
        down, up = torch.randn(4, w.shape[1], generator=g) * 0.3, torch.randn(w.shape[0], 4, generator=g) * 0.3
        lora.update({f"diffusion_model.{name}.lora_down.weight": down, f"diffusion_model.{name}.lora_up.weight": up,
                     f"diffusion_model.{name}.alpha": torch.tensor(2.0)})
        merged[name + ".weight"] = w + 0.5 * (2.0 / 4) * (up @ down)
    (work / "loras").mkdir(exist_ok=True)
    save_file(lora, str(work / "loras" / "tiny-kitchen-lora.safetensors"))
    folder_paths.folder_names_and_paths["loras"] = ([str(work / "loras")], {".safetensors"})
    with torch.inference_mode():
        lm = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(ours, "tiny-kitchen-lora.safetensors", 0.5)[0]
    bonsai_patcher = type(lm)
    lm.__class__ = pack.nodes.comfy_native._patcher_class(DynamicLoadStandIn.mixin(comfy.model_patcher.ModelPatcher))
    with torch.inference_mode():
        lm.load(torch.device("cpu"))
    mods = [m for _, m in layers]
    RESULTS["lora_left_for_comfy_to_merge"] = sum(getattr(m, "weight_lowvram_function", None) is not None for m in mods)
    RESULTS["lora_kept_beside"] = sum(m.__dict__.get("bonsai_lowvram") is not None for m in mods)
    with torch.inference_mode():
        t = torch.full((1,), 0.5)
        latent, cond = sample_args[0], sample_args[1]
        got = lm.model.apply_model(latent, t, c_crossattn=cond)
        want = check.dense_model(merged).model.apply_model(latent, t, c_crossattn=cond)
        base = check.dense_model(truth_sd).model.apply_model(latent, t, c_crossattn=cond)
    RESULTS["lora_rel"] = check.rel(got, want)
    RESULTS["lora_effect"] = check.rel(want, base)
    lm.unpatch_model()
    RESULTS["lora_after_unpatch"] = sum(m.__dict__.get("bonsai_lowvram") is not None for m in mods)
    lm.__class__ = bonsai_patcher


def main():
    work = Path(tempfile.mkdtemp(prefix="bonsai-kitchen-"))
    check._ours("comfy_stub").stub_missing_torchaudio()
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management as mm

    pack = check._pack()
    import comfyui_version

    RESULTS["comfyui"] = comfyui_version.__version__
    native_mod = pack.nodes.comfy_native
    kitchen = sys.modules[pack.__name__ + ".nodes.kitchen_layout"]
    RESULTS["dynamic_vram_on"] = bool(getattr(sys.modules.get("comfy.memory_management"), "aimdo_enabled", False))
    why = native_mod._dynamic_vram_problem() or kitchen.problem()
    RESULTS["kitchen_problem"] = why
    try:
        import importlib.metadata

        RESULTS["comfy_kitchen"] = importlib.metadata.version("comfy-kitchen")
    except importlib.metadata.PackageNotFoundError:
        RESULTS["comfy_kitchen"] = None
    os.environ["BONSAI_KITCHEN"] = "auto"
    RESULTS["auto_form_on_cpu"] = native_mod.kitchen_form()
    if why is not None:  # ComfyUI 0.3.64: no comfy_kitchen; asking for it is refused by name
        os.environ["BONSAI_KITCHEN"] = "on"
        try:
            native_mod.kitchen_form()
        except Exception as e:  # noqa: BLE001
            RESULTS["on_refused"] = [type(e).__name__, str(e)]
        print("RESULTS " + json.dumps(RESULTS))
        return
    from bonsai_core.native import read_native

    # FLUX.2 [klein]: the GGUF through the node, as a user loads it
    import folder_paths

    path = check.tiny_klein_gguf(work)
    folder_paths.folder_names_and_paths["diffusion_models"] = ([str(path.parent)], {".gguf"})
    native = read_native(path).tensors
    os.environ["BONSAI_KITCHEN"] = "on"
    with torch.inference_mode():
        ours = pack.nodes.BonsaiDiffusionModelLoader().load(path.name)[0]
    classic = load(pack, native, "off")
    truth_sd = {k: (v.dequantize(torch.float32) if getattr(v, "qtype", None) == "Q1_0" else v.float())
                for k, v in native.items()}
    truth = check.dense_model(truth_sd)
    RESULTS["klein_patcher"] = type(ours).__name__
    sizes("klein", ours, classic, truth, native, kitchen)
    latent = torch.randn(1, 128, 4, 4, generator=torch.Generator().manual_seed(3))
    cond = torch.randn(1, 8, 256, generator=torch.Generator().manual_seed(4))
    want = check.sample(truth, latent, cond)
    got = check.sample(ours, latent, cond)
    RESULTS["klein_rel"] = check.rel(got, want)
    RESULTS["klein_equals_classic"] = bool(torch.equal(got, check.sample(classic, latent, cond)))
    staged_sample("klein", ours, kitchen, (latent, cond), want)
    mm.unload_all_models()
    lora_case(work, pack, ours, truth_sd, kitchen, (latent, cond))

    # SD1.5: 1-bit 3x3 and 1x1 convolutions as well as linears
    mm.unload_all_models()
    _dsd, _names, sd_native = check.tiny_sd_native()
    ours, classic = load(pack, sd_native, "on"), load(pack, sd_native, "off")
    truth = check.dense_model({k: (v.dequantize(torch.float32) if getattr(v, "qtype", None) == "Q1_0" else v.float())
                               for k, v in sd_native.items()})
    sizes("sd", ours, classic, truth, sd_native, kitchen)
    RESULTS["sd_kitchen_convs"] = sum(m.weight.dim() == 4 for _, m in packed_layers(ours.model, kitchen.is_q1))
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(4))
    want = check.sample(truth, latent, cond, scheduler="normal")
    got = check.sample(ours, latent, cond, scheduler="normal")
    RESULTS["sd_rel"] = check.rel(got, want)
    RESULTS["sd_equals_classic"] = bool(torch.equal(got, check.sample(classic, latent, cond, scheduler="normal")))
    staged_sample("sd", ours, kitchen, (latent, cond), want, scheduler="normal")
    moves(pack, kitchen)
    print("RESULTS " + json.dumps(RESULTS))


if __name__ == "__main__":
    main()
