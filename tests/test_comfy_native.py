"""The native ComfyUI MODEL (nodes/comfy_native.py, bonsai_core/native.py).

Without ComfyUI: the LoRA side computation against the merged weight, and the SD name table
against the diffusers UNet's own module tree. With ``COMFYUI_PATH`` (and ``COMFYUI_PYTHON``):
tests/comfy_native_check.py runs inside that ComfyUI and compares our MODEL with ComfyUI's own
loader of the dequantized weights, a LoRA through core LoraLoaderModelOnly with merged weights
computed by hand, and the Q1_0 GGUF through the node.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tests.comfy_stub import load_pack, run_check


class LoRAAdapter:  # the shape of ComfyUI's comfy.weight_adapter.LoRAAdapter: .weights = (up, down, alpha, mid, dora, reshape)
    def __init__(self, up, down, alpha=None):
        self.weights = (up, down, alpha, None, None, None)


@pytest.fixture(scope="module")
def native():
    return load_pack("ComfyUI_Bonsai_native_unit").nodes.comfy_native


def test_lora_terms_on_fused_rows_equal_the_merged_weight(native):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 8, generator=g)
    x = torch.randn(3, 8, generator=g)
    a = LoRAAdapter(torch.randn(4, 2, generator=g), torch.randn(2, 8, generator=g), alpha=1.0)  # rows 4..7
    b = LoRAAdapter(torch.randn(12, 3, generator=g), torch.randn(3, 8, generator=g))
    patches = [(0.7, a, 1.0, (0, 4, 4), None), (0.25, b, 0.5, None, None)]
    merged = w.clone()
    merged[4:8] += 0.7 * (1.0 / 2) * a.weights[0] @ a.weights[1]
    merged = 0.5 * merged + 0.25 * b.weights[0] @ b.weights[1]
    terms = native.lora_terms(patches, tuple(w.shape), x.device, x.dtype, {})
    y = native.add_lora(F.linear(x, w), x, terms, native._linear_delta, -1)
    torch.testing.assert_close(y, F.linear(x, merged), rtol=1e-5, atol=1e-5)


def test_lora_terms_on_a_conv_equal_the_merged_kernel(native):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 4, 3, 3, generator=g)
    x = torch.randn(1, 4, 7, 7, generator=g)
    a = LoRAAdapter(torch.randn(6, 2, 1, 1, generator=g), torch.randn(2, 4, 3, 3, generator=g), alpha=4.0)
    merged = w + 0.5 * 2.0 * (a.weights[0].flatten(1) @ a.weights[1].flatten(1)).reshape(w.shape)
    terms = native.lora_terms([(0.5, a, 1.0, None, None)], tuple(w.shape), x.device, x.dtype, {})

    def delta(x, d, u):
        return F.conv2d(F.conv2d(x, d, None, 1, 1), u.reshape(*u.shape, 1, 1))

    y = native.add_lora(F.conv2d(x, w, None, 1, 1), x, terms, delta, 1)
    torch.testing.assert_close(y, F.conv2d(x, merged, None, 1, 1), rtol=1e-5, atol=1e-5)


def test_a_patch_that_needs_the_dense_weight_is_refused_by_name(native):
    with pytest.raises(Exception, match="'diff' patch on a 1-bit") as err:  # the pack's own copy of the class
        native.lora_terms([(1.0, ("diff", (torch.zeros(2, 2),)), 1.0, None, None)], (2, 2), "cpu", torch.float32, {})
    assert type(err.value).__name__ == "BonsaiRequestError"


def test_sd_ldm_names_cover_every_tensor_of_a_diffusers_unet_once():
    from diffusers import UNet2DConditionModel

    from bonsai_core.native import sd_unet_ldm_names

    unet = UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=2,
                                cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8, sample_size=8)
    names = sd_unet_ldm_names(list(unet.state_dict()))
    assert len(set(names.values())) == len(names)
    # hand-checked against the ldm UNet: level 0 = input_blocks 1-2, its downsampler 3; level 1 = 4-5
    assert names["down_blocks.0.resnets.1.conv1.weight"] == "input_blocks.2.0.in_layers.2.weight"
    assert names["down_blocks.0.attentions.1.proj_in.weight"] == "input_blocks.2.1.proj_in.weight"
    assert names["down_blocks.0.downsamplers.0.conv.weight"] == "input_blocks.3.0.op.weight"
    assert names["down_blocks.1.resnets.0.conv_shortcut.weight"] == "input_blocks.4.0.skip_connection.weight"
    assert names["up_blocks.0.upsamplers.0.conv.weight"] == "output_blocks.2.1.conv.weight"
    assert names["up_blocks.1.attentions.2.proj_out.weight"] == "output_blocks.5.1.proj_out.weight"
    assert names["mid_block.resnets.1.time_emb_proj.weight"] == "middle_block.2.emb_layers.1.weight"
    assert names["conv_norm_out.weight"] == "out.0.weight"


def test_read_native_gives_a_bonsai_sd_folder_in_ldm_names_with_the_packed_weights_as_stored(tmp_path):
    from bonsai_core import checkpoint
    from bonsai_core.convert import convert_pipeline
    from bonsai_core.native import read_native
    from bonsai_core.quant.tensor import Q1Tensor
    from tests.sd_fixtures import make_tiny_sd_pipeline

    folder = tmp_path / "bonsai"
    convert_pipeline(make_tiny_sd_pipeline(tmp_path / "src"), folder, log=lambda m: None)
    native = read_native(folder)
    stored = checkpoint.read_tensors(checkpoint.find_weights(folder / "unet")).tensors
    assert native.family == "sd_unet" and native.layout == "ldm" and len(native.tensors) == len(stored)
    w = native.tensors["input_blocks.1.1.proj_in.weight"]  # diffusers down_blocks.0.attentions.0.proj_in
    assert isinstance(w, Q1Tensor) and torch.equal(w.qs, stored["down_blocks.0.attentions.0.proj_in.weight"].qs)
    assert torch.equal(native.tensors["out.2.weight"], stored["conv_out.weight"])
    assert read_native(folder / "unet" / "diffusion_pytorch_model.safetensors").tensors.keys() == native.tensors.keys()
    assert native.sampling is None  # SD's own schedule, epsilon: what ComfyUI assumes of the layout


def test_read_native_says_how_a_v_prediction_zero_snr_folder_samples_and_refuses_a_bad_config(tmp_path):
    from bonsai_core.convert import convert_pipeline
    from bonsai_core.errors import BonsaiCheckpointError
    from bonsai_core.native import read_native
    from tests.sd_fixtures import make_tiny_sd_pipeline, set_prediction_type

    folder = tmp_path / "bonsai"
    convert_pipeline(make_tiny_sd_pipeline(tmp_path / "src"), folder, log=lambda m: None)
    set_prediction_type(folder, "v_prediction")
    assert read_native(folder).sampling == {"prediction_type": "v_prediction", "zero_snr": False}
    set_prediction_type(folder, "v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    assert read_native(folder).sampling == {"prediction_type": "v_prediction", "zero_snr": True}
    assert read_native(folder / "unet").sampling is None  # a bare component has no scheduler to read
    set_prediction_type(folder, "epsilon", rescale_betas_zero_snr=True)  # zero SNR cannot predict the noise
    with pytest.raises(BonsaiCheckpointError, match=r"scheduler_config\.json.*v_prediction"):
        read_native(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(BonsaiCheckpointError, match="scheduler_config"):
        read_native(folder)


def test_read_native_gives_a_q1_gguf_in_bfl_names_with_fused_qkv(tmp_path):
    from bonsai_core.importers.flux2_names import is_packed_linear
    from bonsai_core.importers.gguf_q1 import write_gguf
    from bonsai_core.native import read_native
    from bonsai_core.quant.tensor import Q1Tensor
    from tests.flux2_fixtures import TINY_CONFIG, build_model

    diff = {k: (Q1Tensor.from_float(v) if is_packed_linear(k) else v.to(torch.bfloat16))
            for k, v in build_model(TINY_CONFIG).state_dict().items()}
    native = read_native(write_gguf(tmp_path / "klein.gguf", diff))
    assert native.family == "flux2_klein" and native.layout == "bfl"
    qkv = native.tensors["double_blocks.0.img_attn.qkv.weight"]
    want = torch.cat([diff[f"transformer_blocks.0.attn.to_{x}.weight"].dequantize(torch.float32) for x in "qkv"])
    assert isinstance(qkv, Q1Tensor) and torch.equal(qkv.dequantize(torch.float32), want)
    assert native.packed_nbytes * 14 < sum(t.numel() * 2 for t in native.tensors.values() if isinstance(t, Q1Tensor))


def test_read_native_drops_comfyui_s_name_prefix_from_a_gguf(tmp_path, monkeypatch):
    """Community GGUFs saved from ComfyUI carry 'model.diffusion_model.' before every name."""
    from bonsai_core.importers import gguf_q1
    from bonsai_core.importers.flux2_names import is_packed_linear
    from bonsai_core.native import read_native
    from bonsai_core.quant.tensor import Q1Tensor
    from tests.flux2_fixtures import TINY_CONFIG, build_model

    diff = {k: (Q1Tensor.from_float(v) if is_packed_linear(k) else v.to(torch.bfloat16))
            for k, v in build_model(TINY_CONFIG).state_dict().items()}
    path = gguf_q1.write_gguf(tmp_path / "klein.gguf", diff)
    plain = read_native(path).tensors.keys()
    real = gguf_q1.read_gguf_raw

    def prefixed(p):
        raw, notes = real(p)
        return {"model.diffusion_model." + k: t for k, t in raw.items()}, notes

    monkeypatch.setattr(gguf_q1, "read_gguf_raw", prefixed)
    assert read_native(path).tensors.keys() == plain


def test_read_native_refuses_a_dense_file_naming_the_core_loader(tmp_path):
    from safetensors.torch import save_file

    from bonsai_core.errors import BonsaiCheckpointError
    from bonsai_core.native import read_native

    save_file({"w": torch.zeros(2, 2)}, str(tmp_path / "dense.safetensors"))
    with pytest.raises(BonsaiCheckpointError, match="Load Diffusion Model"):
        read_native(tmp_path / "dense.safetensors")


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="set COMFYUI_PATH (and COMFYUI_PYTHON) to run in ComfyUI")
def test_native_model_samples_as_comfyuis_own_loader_of_the_dequantized_weights():
    r = run_check("comfy_native_check.py")
    # SD1.5 (every version): our ldm names are ComfyUI's, and sampling matches to fp32 rounding
    assert r["sd_q1_tensors"] > 0 and r["sd_names_compared"] > 100 and r["sd_names_differ"] == []
    # SDXL (names only, meta device): core detects it from our ldm names and its own table agrees
    assert r["sdxl_detected"] == "SDXL" and r["sdxl_names_compared"] > 1600 and r["sdxl_names_differ"] == []
    ours, dense, packed = r["sd_size_bytes"]  # ComfyUI's size of the model is its packed bytes, in both versions
    assert ours == packed < 0.4 * dense
    assert r["sd_rel"] < 1e-5 and r["sd_packed_params"] == r["sd_q1_tensors"]  # every packed weight kept packed
    assert r["sd_lora_patched_keys"] == 2 and r["sd_lora_rel"] < 1e-5 < 100 * 1e-5 < r["sd_lora_effect"]
    # a folder that says v-prediction on a zero-terminal-SNR schedule is sampled as core's
    # ModelSamplingDiscrete node (v_prediction, zsnr) makes ComfyUI's own model sample it
    assert r["sd_default_sigma_max"] == pytest.approx(14.6, abs=0.05)
    assert r["sd_vz_sigma_max"][0] == r["sd_vz_sigma_max"][1] > 4000
    assert r["sd_vz_prediction"] == [True, True, False]
    assert r["sd_vz_rel"] < 1e-5 and r["sd_vz_effect"] > 0.05
    # 16-bit layers already in the compute dtype call torch directly, as core's own loader builds them
    # (pick_operations), instead of ComfyUI's per-call cast: the rest of the eager step's overhead
    for fam in ("sd", "klein") if "klein_rel" in r else ("sd",):
        assert r[f"{fam}_plain_layers"] > 10
        assert r[f"{fam}_plain_layers_uncast"] == r[f"{fam}_plain_layers"] - r[f"{fam}_core_would_cast"]
    if "klein_rel" not in r:  # ComfyUI without FLUX.2 (0.3.64)
        return
    assert r["klein_q1_tensors"] == r["klein_packed_params"] == 10 and r["klein_model_class"] == "Flux2"
    assert r["klein_size_bytes"][0] < 0.5 * r["klein_size_bytes"][1]  # ComfyUI counts the packed bytes
    assert r["klein_rel"] < 1e-5
    for s in ("1.0", "0.5"):  # LoRA via LoraLoaderModelOnly == merged weights; strength change without reload
        assert r[f"klein_lora_patched_keys_{s}"] == 2
        assert r[f"klein_lora_rel_{s}"] < 1e-5 < 100 * 1e-5 < r[f"klein_lora_effect_{s}"]
    assert r["klein_after_lora_rel"] < 1e-6  # the MODEL without the LoRA is unpatched again
    # low-VRAM load: the LoRA arrives as ComfyUI's LowVramPatch on both patched layers, same result
    assert r["klein_lowvram_patched_layers"] == 2 and r["klein_lowvram_lora_rel"] < 1e-5
    assert r["klein_lowvram_caches_before_unpatch"] == 2 and r["klein_lowvram_caches_after_unpatch"] == 0
    # the FLUX.2 VAE in diffusers' layout (as Bonsai Image 4B ships it) loads in core's VAELoader as it is
    assert r["vae_latent_channels"] == 128 and r["vae_shape"] == [1, 48, 48, 3] and r["vae_max_abs"] < 1e-4
