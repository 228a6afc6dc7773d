"""LoRA files on a 1-bit model: the output equals the same LoRA merged into the dequantized weights.

The reference is built without the engine (tests/lora_fixtures.py): Q1_0 dequantized from the
format's definition into a plain diffusers UNet and transformers CLIP text encoder, the LoRA's
``strength * alpha / rank * up @ down`` added to each target weight, diffusers'
``StableDiffusionPipeline`` run on it. The engine keeps its packed bits and adds side branches.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

from bonsai_core import cli
from bonsai_core.convert import convert_pipeline
from bonsai_core.engine import BonsaiImageEngine
from bonsai_core.errors import BonsaiCheckpointError, BonsaiRequestError
from bonsai_core.quant.layers import BonsaiLinear
from tests import lora_fixtures as lf
from tests.sd_fixtures import make_tiny_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")
W, H, STEPS, CFG, SEED = 64, 64, 3, 5.0, 3
PROMPT, NEGATIVE = "a red cat on a mat", "a blue dog"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    src = make_tiny_sd_pipeline(root / "fp")
    dst = convert_pipeline(src, root / "bonsai", log=lambda m: None).dst
    eng = BonsaiImageEngine.from_pretrained(dst, device="cpu", dtype="fp32")
    fam = eng.family
    unet_mods = {m: fam.unet.get_submodule(m) for m in lf.UNET_TARGETS}
    te_mods = {m: fam.text_encoder.get_submodule(m) for m in lf.TE_TARGETS}
    assert isinstance(unet_mods[lf.UNET_TARGETS[0]], BonsaiLinear)  # 1-bit and dense targets both present
    assert type(unet_mods[lf.UNET_TARGETS[1]]) is torch.nn.Linear
    pairs = {("unet", k): v for k, v in lf.random_pairs(unet_mods, rank=4, seed=1).items()}
    pairs |= {("text_encoder", k): v for k, v in lf.random_pairs(te_mods, rank=4, seed=2).items()}
    alphas = {key: (2.0 if i % 2 else 4.0) for i, key in enumerate(pairs)}  # scales 0.5 and 1.0, per layer
    kohya = lf.write_kohya(root / "style_kohya.safetensors", pairs, alphas)
    return dict(root=root, folder=dst, eng=eng, pairs=pairs, alphas=alphas, kohya=kohya)


def reference_images(model, merges_by_comp, seed=SEED):
    folder = model["folder"]
    fam = model["eng"].family
    unet = lf.reference_unet(folder, merges_by_comp.get("unet", []))
    te = lf.reference_text_encoder(folder, merges_by_comp.get("text_encoder", []))
    pipe = StableDiffusionPipeline(vae=fam.vae, text_encoder=te, tokenizer=fam.tokenizer(), unet=unet,
                                   scheduler=EulerDiscreteScheduler.from_config(fam.scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(fam.latent_shape(W, H), generator=torch.Generator().manual_seed(seed))[None]
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, width=W, height=H,
                latents=latents, output_type="pt").images.permute(0, 2, 3, 1)


def generate(eng, seed=SEED):
    return eng.generate(PROMPT, NEGATIVE, steps=STEPS, guidance=CFG, width=W, height=H, seed=seed, sampler="euler")


def kohya_merges(model, strength):
    out = {}
    for (comp, module), (down, up) in model["pairs"].items():
        out.setdefault(comp, []).append((module, down, up, strength * model["alphas"][(comp, module)] / down.shape[0]))
    return out


def test_a_kohya_lora_changes_the_image_exactly_as_merging_it_into_the_dequantized_weights(model):
    eng = model["eng"]
    bits = {n: m.weight.qs.clone() for n, m in eng.family.unet.named_modules() if isinstance(m, BonsaiLinear)}
    base = generate(eng).tensor
    eng.load_lora(model["kohya"], strength=0.8)
    try:
        ours = generate(eng)
        ref = reference_images(model, kohya_merges(model, 0.8))
        assert ref.std() > 0.01
        assert (ours.tensor - ref).abs().max().item() <= 1e-4
        assert (ours.tensor - base).abs().max().item() > 1e-3  # the LoRA did change the image
        assert ours.metadata["loras"] == [{"name": "style_kohya.safetensors", "strength": 0.8}]
        assert "LoRA: style_kohya.safetensors:0.8" in ours.parameters_text()
        # the packed bits were never rewritten
        assert all(torch.equal(m.weight.qs, bits[n]) for n, m in eng.family.unet.named_modules()
                   if isinstance(m, BonsaiLinear))
    finally:
        eng.unload_lora("style_kohya")
    again = generate(eng).tensor
    assert torch.equal(again, base)  # unloaded: exactly the model it was (prompt cache refreshed too)
    assert not any(hasattr(m, "lora") and len(m.lora) for m in eng.family.unet.modules())
    assert not any(hasattr(m, "lora") for m in eng.family.text_encoder.modules())  # dense slots removed


def test_two_adapters_at_once_with_their_own_strengths_and_one_unloaded_alone(model):
    eng = model["eng"]
    unet_only = {k: v for k, v in model["pairs"].items() if k[0] == "unet"}
    second = {k: (torch.flip(d, [0]) * 0.5, u) for k, (d, u) in unet_only.items()}
    peft = lf.write_peft(model["root"] / "second_peft.safetensors", second, lora_alpha=2.0)  # scale 2/4
    eng.load_lora(model["kohya"], strength=0.5)
    eng.load_lora(peft, strength=1.5)
    try:
        both = generate(eng).tensor
        merges = kohya_merges(model, 0.5)
        merges["unet"] += [(m, d, u, 1.5 * 2.0 / 4) for (_c, m), (d, u) in second.items()]
        assert (both - reference_images(model, merges)).abs().max().item() <= 1e-4
        eng.unload_lora("style_kohya")
        eng.set_lora_strength("second_peft", 0.25)
        only = generate(eng).tensor
        ref = reference_images(model, {"unet": [(m, d, u, 0.25 * 2.0 / 4) for (_c, m), (d, u) in second.items()]})
        assert (only - ref).abs().max().item() <= 1e-4
    finally:
        eng.use_loras([])
    assert eng.lora_set().names() == []


def test_use_loras_keeps_unchanged_files_and_sums_a_file_listed_twice(model):
    eng = model["eng"]
    eng.use_loras([(model["kohya"], 0.3), (model["kohya"], 0.2)])
    adapter = eng.lora_set().adapters[str(model["kohya"])]
    eng.use_loras([(model["kohya"], 0.5)])
    assert eng.lora_set().adapters[str(model["kohya"])] is adapter and adapter.strength == 0.5  # not re-read
    eng.use_loras([])
    assert eng.lora_set().names() == []


def test_keys_that_match_nothing_are_named_and_nothing_is_attached(model, tmp_path):
    from safetensors.torch import save_file

    eng = model["eng"]
    good = lf.kohya_key("unet", lf.UNET_TARGETS[0])
    down, up = model["pairs"][("unet", lf.UNET_TARGETS[0])]
    sd = {f"{good}.lora_down.weight": down, f"{good}.lora_up.weight": up,
          "lora_unet_down_blocks_7_resnets_0_conv1.lora_down.weight": torch.zeros(4, 128, 3, 3),
          "lora_unet_down_blocks_7_resnets_0_conv1.lora_up.weight": torch.zeros(128, 4, 1, 1)}
    save_file(sd, str(tmp_path / "other.safetensors"))
    with pytest.raises(BonsaiCheckpointError, match=r"(?s)1 of the LoRA's layers match nothing.*"
                                                    r"down_blocks\.7\.resnets\.0\.conv1: no such layer"):
        eng.load_lora(tmp_path / "other.safetensors")
    assert eng.lora_set().names() == [] and not len(eng.family.unet.get_submodule(lf.UNET_TARGETS[0]).lora)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter = eng.load_lora(tmp_path / "other.safetensors", strict=False)
    assert any("down_blocks.7.resnets.0.conv1" in str(w.message) for w in caught)
    assert [n for n, _m in adapter.modules] == [f"unet.{lf.UNET_TARGETS[0]}"]
    eng.unload_lora("other")
    # wrong shape: named with both shapes
    save_file({f"{good}.lora_down.weight": torch.zeros(4, 64), f"{good}.lora_up.weight": torch.zeros(128, 4)},
              str(tmp_path / "shape.safetensors"))
    with pytest.raises(BonsaiCheckpointError, match=r"attn1\.to_q: down \[4, 64\] / up \[128, 4\] do not fit"):
        eng.load_lora(tmp_path / "shape.safetensors")


def test_files_that_are_not_plain_safetensors_loras_are_refused(model, tmp_path):
    from safetensors.torch import save_file

    eng = model["eng"]
    (tmp_path / "x.pt").write_bytes(b"\x80\x04")
    with pytest.raises(BonsaiCheckpointError, match=r"x\.pt: LoRA files are read as \.safetensors only"):
        eng.load_lora(tmp_path / "x.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(BonsaiCheckpointError, match="not a readable safetensors file"):
        eng.load_lora(tmp_path / "bad.safetensors")
    key = lf.kohya_key("unet", lf.UNET_TARGETS[0])
    save_file({f"{key}.lora_down.weight": torch.zeros(4, 128), f"{key}.lora_up.weight": torch.zeros(128, 4),
               f"{key}.dora_scale": torch.ones(128, 1)}, str(tmp_path / "dora.safetensors"))
    with pytest.raises(BonsaiCheckpointError, match="DoRA"):
        eng.load_lora(tmp_path / "dora.safetensors")
    with pytest.raises(BonsaiRequestError, match="no LoRA 'nothing' is loaded"):
        eng.unload_lora("nothing")
    with pytest.raises(BonsaiCheckpointError, match="LoRA file not found"):
        eng.load_lora(tmp_path / "missing.safetensors")


def test_cli_generate_takes_repeatable_lora_file_strength(model, tmp_path, capsys):
    out = tmp_path / "a.png"
    args = ["generate", PROMPT, "-n", NEGATIVE, "--model", str(model["folder"]), "--device", "cpu", "--steps",
            str(STEPS), "--cfg", str(CFG), "--width", str(W), "--height", str(H), "--seed", str(SEED),
            "--sampler", "euler", "--dtype", "fp32", "--out", str(out)]
    assert cli.main(args + ["--lora", f"{model['kohya']}:0.8"]) == 0
    from PIL import Image

    with Image.open(out) as im:
        assert "LoRA: style_kohya.safetensors:0.8" in im.text["parameters"]
        pixels = torch.tensor(list(im.getdata()), dtype=torch.float32).view(H, W, 3) / 255
    ref = reference_images(model, kohya_merges(model, 0.8))[0]
    assert (pixels - ref).abs().max().item() <= 1 / 255 + 1e-4
    assert "LoRA style_kohya.safetensors: 10 layers at strength 0.8" in capsys.readouterr().err
    assert cli.main(args + ["--lora", str(tmp_path / "none.safetensors")]) == 2
    assert "none.safetensors" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- FLUX.2 klein
def test_an_ai_toolkit_flux2_lora_on_1bit_klein_equals_it_merged_into_the_dequantized_transformer(tmp_path):
    """BFL names (``diffusion_model.double_blocks.0.img_attn.qkv`` is q, k, v stacked by rows) mapped by
    diffusers' FLUX.2 converter; the reference splits the rows itself and merges into a plain
    ``Flux2Transformer2DModel`` holding the spec-dequantized weights."""
    from diffusers import Flux2Transformer2DModel
    from safetensors.torch import save_file

    from tests.klein_fixtures import make_full_pipeline

    folder = convert_pipeline(make_full_pipeline(tmp_path / "fp"), tmp_path / "bonsai", log=lambda m: None).dst
    eng = BonsaiImageEngine.from_pretrained(folder, device="cpu", dtype="fp32")
    g = torch.Generator().manual_seed(5)
    r = 4

    def pair(fan_in, out):
        return torch.randn(r, fan_in, generator=g) * 0.05, torch.randn(out, r, generator=g) * 0.05

    bfl = {"double_blocks.0.img_attn.qkv": pair(128, 384), "single_blocks.1.linear1": pair(128, 1152),
           "final_layer.linear": pair(128, 128), "img_in": pair(128, 128)}
    sd = {}
    for name, (a, b) in bfl.items():
        sd[f"diffusion_model.{name}.lora_A.weight"], sd[f"diffusion_model.{name}.lora_B.weight"] = a, b
    save_file(sd, str(tmp_path / "klein_style.safetensors"))
    merges = []  # the FLUX.2 names of BFL's layers, from the two models' layouts
    a, b = bfl["double_blocks.0.img_attn.qkv"]
    for part, rows in zip(("to_q", "to_k", "to_v"), b.chunk(3)):
        merges.append((f"transformer_blocks.0.attn.{part}", a, rows))
    merges += [("single_transformer_blocks.1.attn.to_qkv_mlp_proj", *bfl["single_blocks.1.linear1"]),
               ("proj_out", *bfl["final_layer.linear"]), ("x_embedder", *bfl["img_in"])]
    state = lf.dequantized_state_dict(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    for module, down, up in merges:
        lf.merge(state, module, down, up, 0.7)
    ref = Flux2Transformer2DModel.from_config(Flux2Transformer2DModel.load_config(folder / "transformer"))
    ref.load_state_dict(state)
    ref.eval()

    cfg = ref.config
    x = torch.randn(1, 16, cfg.in_channels, generator=g)
    ctx = torch.randn(1, 8, cfg.joint_attention_dim, generator=g)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                         indexing="ij"), -1).reshape(1, 16, 4)
    txt_ids = torch.cat([torch.zeros(1, 8, 3), torch.arange(8.0).view(1, 8, 1)], -1)
    kw = dict(hidden_states=x, encoder_hidden_states=ctx, timestep=torch.tensor([0.5]), img_ids=img_ids,
              txt_ids=txt_ids)
    with torch.inference_mode():
        base = eng.family._forward(**kw)
        eng.load_lora(tmp_path / "klein_style.safetensors", strength=0.7)
        ours = eng.family._forward(**kw)
        want = ref(**kw, guidance=None, return_dict=False)[0]
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)
    # a text-encoder key on klein: transformer only (as diffusers' Flux2 loader), so it is named as unmatched
    save_file({"text_encoder.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 64),
               "text_encoder.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 2),
               **{k: v for k, v in sd.items() if "img_in" in k}}, str(tmp_path / "te.safetensors"))
    with pytest.raises(BonsaiCheckpointError, match=r"no LoRA-capable 'text_encoder' \(it has transformer\)"):
        eng.load_lora(tmp_path / "te.safetensors")


# ---------------------------------------------------------------------------------------------- SDXL
def test_an_sdxl_kohya_lora_in_sgm_names_reaches_the_unet_and_both_text_encoders(tmp_path):
    """kohya trains SDXL on the sgm UNet (``input_blocks_3_1`` is the second down block's attention
    when layers_per_block is 1) and names the encoders ``te1`` / ``te2``: diffusers' SDXL loader maps
    them with the UNet's config."""
    from safetensors.torch import save_file

    from tests.sd_fixtures import make_tiny_sdxl_pipeline

    folder = convert_pipeline(make_tiny_sdxl_pipeline(tmp_path / "fp"), tmp_path / "bonsai", log=lambda m: None).dst
    eng = BonsaiImageEngine.from_pretrained(folder, device="cpu", dtype="fp32")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for key, fan_in, out in (("lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q", 256, 256),
                             ("lora_unet_output_blocks_0_1_transformer_blocks_1_attn2_to_k", 128, 256),
                             ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 64, 64),
                             ("lora_te2_text_model_encoder_layers_2_mlp_fc2", 128, 64)):
        sd[f"{key}.lora_down.weight"] = torch.randn(2, fan_in, generator=g) * 0.3
        sd[f"{key}.lora_up.weight"] = torch.randn(out, 2, generator=g) * 0.3
        sd[f"{key}.alpha"] = torch.tensor(1.0)
    save_file(sd, str(tmp_path / "xl.safetensors"))
    kw = dict(steps=2, width=64, height=64, seed=1)
    base = eng.generate("a fox", **kw).tensor
    adapter = eng.load_lora(tmp_path / "xl.safetensors")
    assert sorted(n.split(".")[0] for n, _m in adapter.modules) == ["text_encoder", "text_encoder_2", "unet", "unet"]
    assert [n for n, _m in adapter.modules if n.startswith("unet")] == [
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "unet.up_blocks.0.attentions.0.transformer_blocks.1.attn2.to_k"]
    assert not torch.equal(eng.generate("a fox", **kw).tensor, base)
    eng.unload_lora("xl")
    assert torch.equal(eng.generate("a fox", **kw).tensor, base)


def test_a_text_encoder_lora_on_a_4bit_text_encoder_is_a_side_branch_of_its_packed_layer(tmp_path):
    """``convert --quantize-text-encoder`` packs the CLIP text encoder in 4 bits: a LoRA on it uses the
    packed layer's own slot, the merged reference dequantizes the layer with its own tensor (the
    4-bit format is tested against its spec elsewhere; here the branch is what is checked)."""
    from bonsai_core.quant.layers import BonsaiLinear

    folder = convert_pipeline(make_tiny_sd_pipeline(tmp_path / "fp"), tmp_path / "bonsai", quantize_text_encoder=True,
                              log=lambda m: None).dst
    eng = BonsaiImageEngine.from_pretrained(folder, device="cpu", dtype="fp32")
    te = eng.family.text_encoder
    layer = te.get_submodule(lf.TE_TARGETS[0])
    assert isinstance(layer, BonsaiLinear) and type(layer.weight).__name__ == "Q4Tensor"
    pairs = {("text_encoder", m): v for m, v in lf.random_pairs({m: te.get_submodule(m) for m in lf.TE_TARGETS},
                                                                rank=4, seed=9, scale=0.2).items()}
    path = lf.write_kohya(tmp_path / "te.safetensors", pairs, {k: 4.0 for k in pairs})
    x = torch.randn(2, 5, 128)
    base = layer(x)
    eng.load_lora(path, strength=0.6)
    down, up = pairs[("text_encoder", lf.TE_TARGETS[0])]
    merged = layer.weight.dequantize(torch.float32) + 0.6 * up @ down
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, merged, layer.bias), rtol=1e-5, atol=1e-5)
    eng.unload_lora("te")
    assert torch.equal(layer(x), base)
