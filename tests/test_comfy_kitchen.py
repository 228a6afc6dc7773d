"""The native MODEL's kitchen form: 1-bit weights as comfy_kitchen tensors of the pack's Q1_0 layout
(nodes/kitchen_layout.py), which the loader hands ComfyUI when its dynamic VRAM is on.

Without ComfyUI: the choice of form (``BONSAI_KITCHEN``) and its refusals. With ``COMFYUI_PATH``
(and ``COMFYUI_PYTHON``): tests/comfy_kitchen_check.py runs inside that ComfyUI. In 0.33 it checks
ComfyUI's own size accounting, staging copies, moves and core sampling on the kitchen form against
the Q1_0 sizes from the shapes and ComfyUI's own loader of the dequantized weights; in 0.3.64 (no
comfy_kitchen) that the form is refused by name. Dynamic VRAM itself needs CUDA:
benchmarks/comfy_dynamic_vram_check.py runs it on a GPU.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.comfy_stub import load_pack, run_check


@pytest.fixture(scope="module")
def pack():
    return load_pack("ComfyUI_Bonsai_kitchen_unit")


def test_an_unknown_kitchen_setting_is_refused_naming_the_choices(pack, monkeypatch):
    monkeypatch.setenv("BONSAI_KITCHEN", "yes")
    with pytest.raises(Exception, match="BONSAI_KITCHEN='yes': expected one of auto, on, off") as err:
        pack.nodes.comfy_native.kitchen_form()
    assert type(err.value).__name__ == "BonsaiError"


def test_without_dynamic_vram_auto_and_off_keep_the_classic_form(pack, monkeypatch):
    for value in ("auto", "off", ""):
        monkeypatch.setenv("BONSAI_KITCHEN", value)
        assert pack.nodes.comfy_native.kitchen_form() is False


def test_by_default_the_kitchen_form_where_dynamic_vram_is_on_and_classic_where_it_is_off(pack, monkeypatch):
    """The kitchen form is the default under dynamic VRAM (it has run under CUDA dynamic VRAM: same images,
    0.39x the classic form's peak); BONSAI_KITCHEN=off keeps the classic form."""
    import types

    monkeypatch.delenv("BONSAI_KITCHEN", raising=False)
    fake = types.ModuleType("comfy.memory_management")
    fake.aimdo_enabled = True
    comfy = sys.modules.get("comfy") or types.ModuleType("comfy")
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setattr(comfy, "memory_management", fake, raising=False)
    monkeypatch.setitem(sys.modules, "comfy.memory_management", fake)
    native = pack.nodes.comfy_native
    monkeypatch.setattr(native, "_dynamic_vram_problem", lambda: None)  # as if every internal were there
    monkeypatch.setattr(native.kitchen_layout, "problem", lambda: None)
    assert native.kitchen_form() is True
    monkeypatch.setenv("BONSAI_KITCHEN", "off")
    assert native.kitchen_form() is False
    monkeypatch.setenv("BONSAI_KITCHEN", "auto")
    assert native.kitchen_form() is True
    monkeypatch.delenv("BONSAI_KITCHEN")
    fake.aimdo_enabled = False  # dynamic VRAM off (--disable-dynamic-vram, the CPU): the classic form
    assert native.kitchen_form() is False


def test_asking_for_the_kitchen_form_where_comfyui_has_none_says_why(pack, monkeypatch):
    if "comfy" in sys.modules and hasattr(sys.modules["comfy"], "__path__"):
        pytest.skip("a real ComfyUI is imported in this process")
    monkeypatch.setenv("BONSAI_KITCHEN", "on")
    with pytest.raises(Exception, match="BONSAI_KITCHEN=on, but ComfyUI .* has no comfy_kitchen weight path"):
        pack.nodes.comfy_native.kitchen_form()


def test_the_layout_matches_only_comfy_kitchen_tensors_of_its_own_name(pack):
    import torch

    from bonsai_core.quant.tensor import Q1Tensor

    kitchen = sys.modules[pack.__name__ + ".nodes.kitchen_layout"]

    class QuantizedTensor:  # the shape of comfy_kitchen's class: its layout by name
        def __init__(self, layout):
            self._layout_cls = layout

    assert kitchen.is_q1(QuantizedTensor("BonsaiQ1_0Layout"))
    assert not kitchen.is_q1(QuantizedTensor("TensorCoreFP8Layout"))
    assert not kitchen.is_q1(Q1Tensor.from_float(torch.randn(2, 128)))
    assert pack.nodes.comfy_native.is_q1(QuantizedTensor("BonsaiQ1_0Layout"))


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH (and COMFYUI_PYTHON) to run in ComfyUI")
def test_kitchen_form_is_sized_staged_and_sampled_by_comfyui_as_packed_weights():
    r = run_check("comfy_kitchen_check.py")
    assert r["dynamic_vram_on"] is False and r["auto_form_on_cpu"] is False  # CPU: dynamic VRAM off, classic form
    if r["comfy_kitchen"] is None:  # ComfyUI without comfy_kitchen (0.3.64): refused by name
        assert "comfy_kitchen" in r["kitchen_problem"]
        assert r["on_refused"][0] == "BonsaiError" and "BONSAI_KITCHEN=on" in r["on_refused"][1]
        return
    assert r["kitchen_problem"] is None  # comfy_kitchen here (0.33 pins 0.2.31): the layout registers and self-checks
    for fam in ("klein", "sd"):
        assert r[f"{fam}_kitchen_params"] == r[f"{fam}_q1_tensors"] > 0 and r[f"{fam}_classic_kitchen_params"] == 0
        counted, from_shapes, fp16 = r[f"{fam}_weight_bytes"]
        assert counted == from_shapes  # ComfyUI's module_size reads every packed byte, and only those
        # ... what dynamic VRAM allocates per layer: the packed bytes (1 KiB aligned), where a plain
        # (Q1Tensor) weight would be sized at its shape x dtype
        kitchen_vbar, kitchen_expected, plain_vbar = r[f"{fam}_vbar_bytes"]
        assert kitchen_vbar == kitchen_expected and plain_vbar > 10 * kitchen_vbar
        ours, classic, dense = r[f"{fam}_module_size"]
        assert ours == classic == r[f"{fam}_model_size"] < 0.4 * dense
        assert r[f"{fam}_rel"] < 1e-5 and r[f"{fam}_equals_classic"]  # core sampler: as ComfyUI's own loader
        inside, layers, _ = r[f"{fam}_staged_layers"]
        assert inside == layers == r[f"{fam}_q1_tensors"] and r[f"{fam}_staged_rel"] < 1e-5
    assert r["klein_weight_bytes"][0] * 16 == r["klein_weight_bytes"][2] * 1.125  # 1.125 bits a weight (1/14.2 of fp16)
    assert r["sd_kitchen_convs"] > 0
    # a LoRA handed as dynamic VRAM does (weight_lowvram_function) is kept beside, never merged by ComfyUI
    assert r["lora_left_for_comfy_to_merge"] == 0 and r["lora_kept_beside"] == 2
    assert r["lora_rel"] < 1e-5 < 100 * 1e-5 < r["lora_effect"] and r["lora_after_unpatch"] == 0
    m = r["moves"]
    assert m["cpu_same_object"] and m["clone"] and m["meta"] and m["module_to_float32"] and m["module_to_meta"]
    assert m["module_values"] == 0.0 and m["forward_rel"] < 1e-6
