"""The ComfyUI nodes, run without ComfyUI (tests/comfy_stub.py stands in for the modules they
touch): every INPUT_TYPES is well-formed, every node runs on a tiny model and returns what it
declares, progress moves every step with a preview, Cancel passes through, errors are Bonsai's."""

import inspect
import json
import re
import sys

import pytest
import torch
from PIL import Image

from bonsai_core.convert import convert_pipeline
from tests import comfy_stub
from tests.sd_fixtures import make_tiny_sd_pipeline

TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "IMAGE", "BONSAI_PIPE", "MODEL", "CLIP"}


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy")
    models = root / "models"
    src = make_tiny_sd_pipeline(root / "fp")
    convert_pipeline(src, models / "bonsai" / "tiny-sd-bonsai", log=lambda m: None)
    mods = comfy_stub.make_modules(models)
    log = mods.pop("_log")
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    pack = comfy_stub.load_pack()
    # the pack's own engine (ComfyUI imports it as <folder>.bonsai_core, not as bonsai_core)
    engine = sys.modules[pack.__name__ + ".bonsai_core.engine"]
    errors = sys.modules[pack.__name__ + ".bonsai_core.errors"]
    yield dict(pack=pack, log=log, mm=mods["comfy.model_management"], fp=mods["folder_paths"], models=models,
               engine=engine, errors=errors)
    engine.unload_current()
    for k, v in saved.items():
        if v is None:
            sys.modules.pop(k, None)
        else:
            sys.modules[k] = v
    for k in [k for k in sys.modules if k.startswith("ComfyUI_Bonsai_stubbed")]:
        sys.modules.pop(k)


@pytest.fixture()
def nodes(comfy):
    comfy["log"]["progress"].clear()
    comfy["mm"].interrupt_after = None
    return {k: v() for k, v in comfy["pack"].NODE_CLASS_MAPPINGS.items()}


def test_every_node_declares_a_well_formed_interface(comfy):
    m = comfy["pack"].NODE_CLASS_MAPPINGS
    assert set(m) == {"BonsaiLoader", "BonsaiSampler", "BonsaiGuardrail", "BonsaiTextOverlay",
                      "BonsaiDiffusionModelLoader", "BonsaiTextEncoderLoader", "BonsaiLoRA"}
    assert set(comfy["pack"].NODE_DISPLAY_NAME_MAPPINGS) == set(m)
    assert comfy["pack"].WEB_DIRECTORY == "./web"
    for node_id, cls in m.items():
        assert cls.CATEGORY == "Bonsai" and len(cls.DESCRIPTION) > 40, node_id
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) == len(cls.OUTPUT_TOOLTIPS), node_id
        assert all(t in TYPES for t in cls.RETURN_TYPES), node_id
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional"}, node_id
        params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
        for section, inputs in spec.items():
            for name, (kind, opts) in inputs.items():
                where = f"{node_id}.{name}"
                assert opts.get("tooltip"), where
                assert (isinstance(kind, str) and kind in TYPES) or (isinstance(kind, list) and kind and all(isinstance(c, str) for c in kind)), where
                if isinstance(kind, list):
                    assert opts["default"] in kind, where
                elif kind in ("INT", "FLOAT"):
                    assert opts["min"] <= opts["default"] <= opts["max"], where
                elif kind == "BOOLEAN":
                    assert isinstance(opts["default"], bool), where
                p = params[name]
                assert (p.default is inspect.Parameter.empty) == (section == "required"), where
        assert set(params) - {"self"} == {n for inputs in spec.values() for n in inputs}, node_id


def test_loader_lists_models_folder_and_registers_it_with_explicit_extensions(comfy):
    names = comfy["pack"].NODE_CLASS_MAPPINGS["BonsaiLoader"].INPUT_TYPES()["required"]["model"][0]
    assert names == ["bonsai-shapes", "tiny-sd-bonsai", "(use the path input)"]  # the shipped model first
    paths, exts = comfy["fp"].folder_names_and_paths["bonsai"]
    assert paths == [str(comfy["models"] / "bonsai")] and exts == {".gguf", ".safetensors", ".json"}


def test_diffusion_model_loader_lists_bonsai_folders_and_files_of_its_three_folders(comfy, tmp_path):
    fp = comfy["fp"]
    (tmp_path / "dm").mkdir()
    (tmp_path / "dm" / "klein-q1_0.gguf").write_bytes(b"GGUF")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "other.safetensors").write_bytes(b"")
    fp.folder_names_and_paths["diffusion_models"] = ([str(tmp_path / "dm"), str(tmp_path / "unet")], {".safetensors"})
    try:
        names = comfy["pack"].NODE_CLASS_MAPPINGS["BonsaiDiffusionModelLoader"].INPUT_TYPES()["required"]["model_name"][0]
    finally:
        del fp.folder_names_and_paths["diffusion_models"]
    assert names == ["klein-q1_0.gguf", "other.safetensors", "tiny-sd-bonsai"]


def test_loader_frees_comfy_memory_then_gives_a_pipe(comfy, nodes):
    comfy["engine"].unload_current()
    comfy["log"]["free_memory"].clear()
    before = comfy["log"]["soft_empty_cache"]
    (pipe,) = nodes["BonsaiLoader"].load("tiny-sd-bonsai", "auto", "auto")
    folder = comfy["models"] / "bonsai" / "tiny-sd-bonsai"
    weights = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    assert comfy["log"]["free_memory"] == [(weights, "cpu")]
    assert comfy["log"]["soft_empty_cache"] == before + 1
    assert pipe.engine().device.type == "cpu" and pipe.device == "cpu" and pipe.dtype is None


def test_a_model_loaded_and_sampled_under_inference_mode_keeps_its_1bit_weights(nodes, comfy):
    """ComfyUI runs every node under torch.inference_mode; loading (with a cast) happens there too."""
    with torch.inference_mode():
        (pipe,) = nodes["BonsaiLoader"].load("tiny-sd-bonsai", "cpu", "bf16")  # a fresh load, cast fp16 -> bf16
        images, _ = nodes["BonsaiSampler"].sample(pipe, "a red tree", "", 5, 2, 7.5, 64, 64, "euler", False, 1)
    unet = pipe.engine().family.unet
    packed = [m.weight for m in unet.modules() if type(m).__name__ in ("BonsaiLinear", "BonsaiConv2d")]
    assert packed and all(type(w).__name__ == "Q1Tensor" and w.dtype == torch.bfloat16 for w in packed)
    assert images.shape == (1, 64, 64, 3) and torch.isfinite(images).all()


def test_sampler_returns_image_and_metadata_and_moves_progress_every_step(nodes, comfy):
    (pipe,) = nodes["BonsaiLoader"].load("tiny-sd-bonsai", "cpu", "fp32")
    images, meta = nodes["BonsaiSampler"].sample(pipe, "a red tree", "", 5, 3, 7.5, 64, 48, "euler", False, 2)
    assert isinstance(images, torch.Tensor) and images.shape == (2, 48, 64, 3) and images.dtype == torch.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    m = json.loads(meta)
    assert m["seeds"] == [5, 6] and m["steps"] == 3 and (m["width"], m["height"]) == (64, 48)
    prog = comfy["log"]["progress"]
    # encode 0, sampling starts 1, steps 2..4 (with previews), decode 4, done 5 — out of 3 + 2
    assert [(v, t) for v, t, _ in prog] == [(0, 5), (1, 5), (2, 5), (3, 5), (4, 5), (4, 5), (5, 5)]
    previews = [p for _, _, p in prog if p is not None]
    assert len(previews) == 3
    for kind, img, size in previews:
        assert kind == "JPEG" and isinstance(img, Image.Image) and img.size == (64, 48) and size == 512


class OldInterrupt(Exception):
    """ComfyUI v0.3.64's InterruptProcessingException derives from Exception: nothing may catch it."""


@pytest.mark.parametrize("after,exc", [(1, comfy_stub.InterruptProcessingException), (4, OldInterrupt),
                                       (7, OldInterrupt)])
def test_cancel_raised_in_a_progress_update_passes_through_untouched(nodes, comfy, after, exc):
    (pipe,) = nodes["BonsaiLoader"].load("tiny-sd-bonsai", "cpu", "fp32")
    comfy["mm"].interrupt_after, comfy["mm"].interrupt_class = after, exc
    try:
        with pytest.raises(exc):
            nodes["BonsaiSampler"].sample(pipe, "a red tree", "", 5, 6, 7.5, 64, 64, "euler", False, 1)
    finally:
        comfy["mm"].interrupt_class = comfy_stub.InterruptProcessingException
    assert len(comfy["log"]["progress"]) == after  # stopped at that update: no further step ran


def test_guardrail_clamps_to_hand_worked_values_and_refuses_in_refuse_mode(nodes, comfy):
    g = nodes["BonsaiGuardrail"]
    # 1000x600, longest side 768: scale 0.768 -> 768 x 460.8, snapped to multiples of 8 -> 768 x 464
    w, h, prompt, steps, report = g.check(1000, 600, "a cat", 24, "clamp")
    assert (w, h, prompt, steps) == (768, 464, "a cat", 24)
    assert "1000x600 -> 768x464" in report
    with pytest.raises(comfy["errors"].BonsaiRequestError, match="width 0"):
        g.check(0, 512, "a cat", 24, "refuse")


def test_guardrail_with_a_pipe_counts_the_models_tokens(nodes):
    (pipe,) = nodes["BonsaiLoader"].load("tiny-sd-bonsai", "cpu", "fp32")
    tokenizer = pipe.engine().family.tokenizer()
    _, _, _, _, report = nodes["BonsaiGuardrail"].check(512, 512, "a cat", 24, "warn", pipe)
    assert f"prompt {len(tokenizer('a cat').input_ids)} tokens" in report


def test_text_overlay_node_draws_on_every_image_of_the_batch(nodes, comfy):
    images = torch.zeros(2, 64, 96, 3)
    spec = comfy["pack"].NODE_CLASS_MAPPINGS["BonsaiTextOverlay"].INPUT_TYPES()
    defaults = {k: v[1]["default"] for k, v in spec["required"].items() if k != "images"}
    (out,) = nodes["BonsaiTextOverlay"].draw(images, **dict(defaults, text="Hi", size=20))
    assert out.shape == images.shape and out.dtype == torch.float32
    assert all((out[i].sum(-1) > 0).sum() > 20 for i in range(2))
    assert comfy["fp"].folder_names_and_paths["fonts"][0] == [str(comfy["models"] / "fonts")]


def test_errors_reach_the_user_as_bonsai_errors_naming_the_value(nodes, comfy, tmp_path):
    errors = comfy["errors"]
    with pytest.raises(errors.BonsaiCheckpointError, match="no-such-model"):
        nodes["BonsaiLoader"].load("(use the path input)", "cpu", "auto", path=str(tmp_path / "no-such-model"))
    with pytest.raises(errors.BonsaiRequestError, match="path"):
        nodes["BonsaiLoader"].load("(use the path input)", "cpu", "auto")
    (pipe,) = nodes["BonsaiLoader"].load("tiny-sd-bonsai", "cpu", "fp32")
    with pytest.raises(errors.BonsaiError, match="100000 characters"):
        nodes["BonsaiSampler"].sample(pipe, "x" * 100_000, "", 0, 2, 7.5, 64, 64, "euler", False, 1)


def test_the_shipped_model_is_listed_first_so_it_is_the_default(comfy, monkeypatch):
    config = sys.modules[comfy["pack"].__name__ + ".bonsai_core.config"]
    assert comfy["pack"].NODE_CLASS_MAPPINGS["BonsaiLoader"].INPUT_TYPES()["required"]["model"][0] == \
        ["bonsai-shapes", "tiny-sd-bonsai", "(use the path input)"]
    monkeypatch.setattr(config, "SHIPPED_MODEL", None)  # an install without it lists what it finds
    assert comfy["pack"].NODE_CLASS_MAPPINGS["BonsaiLoader"].INPUT_TYPES()["required"]["model"][0] == \
        ["tiny-sd-bonsai", "(use the path input)"]


def test_the_loader_loads_the_shipped_model_by_its_listed_name(nodes):
    (pipe,) = nodes["BonsaiLoader"].load("bonsai-shapes", "cpu", "auto")
    images, meta = nodes["BonsaiSampler"].sample(pipe, "a red circle on a white background", "", 0, 2, 7.5, 64, 64,
                                                 "euler", False, 1)
    assert tuple(images.shape) == (1, 64, 64, 3)


def test_the_guardrail_budget_is_comfyuis_free_memory(nodes, comfy):
    (pipe,) = nodes["BonsaiLoader"].load("tiny-sd-bonsai", "cpu", "fp32")
    comfy["mm"].free_bytes = 2**20
    try:
        # host memory: running out would take ComfyUI down, so even warn mode refuses
        with pytest.raises(Exception) as err:  # the pack's own BonsaiMemoryError (imported under its folder name)
            nodes["BonsaiGuardrail"].check(512, 512, "a cat", 24, "warn", pipe)
    finally:
        comfy["mm"].free_bytes = 64 * 2**30
    # 1 MiB free, plus the tiny model's own weights (the estimate counts them too)
    assert type(err.value).__name__ == "BonsaiMemoryError"
    assert re.search(r"0\.0\d GiB is available", str(err.value)), err.value


def test_text_encoder_loader_says_which_comfyui_it_needs(comfy):
    """A ComfyUI without FLUX.2 [klein] text encoding (this stub has no comfy.text_encoders) gets a
    BonsaiError naming the version, not an ImportError from inside the node."""
    node = comfy["pack"].NODE_CLASS_MAPPINGS["BonsaiTextEncoderLoader"]()
    with pytest.raises(comfy["errors"].BonsaiError, match="needs ComfyUI 0.33.0 or later"):
        sys.modules[comfy["pack"].__name__ + ".nodes.comfy_text_encoder"].check_version()
    # a model whose text encoder is not a Bonsai file is refused before any ComfyUI internal is used
    with pytest.raises(comfy["errors"].BonsaiError, match="no Bonsai text encoder file"):
        node.load("(use the path input)", path=str(comfy["models"] / "bonsai" / "tiny-sd-bonsai"))


# ---------------------------------------------------------------------------------------------- Bonsai LoRA
def _lora_file(comfy, name: str, seed: int):
    """A kohya LoRA on one 1-bit and one dense layer of the tiny model, in models/loras/."""
    from tests import lora_fixtures as lf

    path = comfy["models"] / "loras" / name
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fam = comfy["engine"].load_engine(str(comfy["models"] / "bonsai" / "tiny-sd-bonsai"), device="cpu").family
        mods = {m: fam.unet.get_submodule(m) for m in lf.UNET_TARGETS[:2]}
        pairs = {("unet", k): v for k, v in lf.random_pairs(mods, rank=4, seed=seed, scale=0.3).items()}
        lf.write_kohya(path, pairs, {k: 4.0 for k in pairs})
    return path


def _sample(nodes, pipe):
    args = dict(prompt="a fox", negative="", seed=1, steps=2, cfg=5.0, width=64, height=64, sampler="euler",
                karras=False, batch=1)
    return nodes["BonsaiSampler"].sample(pipe, **args)[0]


def test_lora_node_lists_models_loras_and_gives_a_new_pipe_leaving_the_loaders_alone(nodes, comfy):
    _lora_file(comfy, "style_a.safetensors", 1)
    _lora_file(comfy, "style_b.safetensors", 2)
    (comfy["models"] / "loras" / "pickled.pt").write_bytes(b"x")
    spec = comfy["pack"].NODE_CLASS_MAPPINGS["BonsaiLoRA"].INPUT_TYPES()["required"]
    assert spec["lora"][0] == ["style_a.safetensors", "style_b.safetensors"]  # safetensors only
    (base,) = nodes["BonsaiLoader"].load("tiny-sd-bonsai", "cpu", "fp32")
    plain = _sample(nodes, base)
    (with_a,) = nodes["BonsaiLoRA"].apply(base, "style_a.safetensors", 1.0)
    (with_b,) = nodes["BonsaiLoRA"].apply(base, "style_b.safetensors", 1.0)  # a second branch off the same loader
    (with_ab,) = nodes["BonsaiLoRA"].apply(with_a, "style_b.safetensors", 0.5)
    assert base.loras == () and len(with_a.loras) == 1 and len(with_ab.loras) == 2  # the input pipe is untouched
    a, b, ab = _sample(nodes, with_a), _sample(nodes, with_b), _sample(nodes, with_ab)
    # ComfyUI reruns only what changed: the cached loader output still samples without any LoRA,
    # and each branch samples with its own LoRAs whatever ran before
    assert torch.equal(_sample(nodes, base), plain)
    assert torch.equal(_sample(nodes, with_b), b) and torch.equal(_sample(nodes, with_a), a)
    assert torch.equal(_sample(nodes, with_ab), ab)
    assert not torch.equal(a, plain) and not torch.equal(a, b) and not torch.equal(ab, a)
    eng = base.engine()
    assert eng.lora_set().names() == []  # nothing left attached once the base pipe is used


def test_lora_node_errors_are_bonsai_errors_naming_the_file(nodes, comfy):
    from safetensors.torch import save_file

    bad = comfy["models"] / "loras" / "for_another_model.safetensors"
    bad.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_nothing_here.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_nothing_here.lora_up.weight": torch.zeros(8, 2)}, str(bad))
    (base,) = nodes["BonsaiLoader"].load("tiny-sd-bonsai", "cpu", "fp32")
    with pytest.raises(comfy["errors"].BonsaiCheckpointError,
                       match=r"(?s)for_another_model\.safetensors: no key of this LoRA fits.*unet\.nothing\.here"):
        nodes["BonsaiLoRA"].apply(base, "for_another_model.safetensors", 1.0)
    with pytest.raises(comfy["errors"].BonsaiRequestError, match="models/loras"):
        nodes["BonsaiLoRA"].apply(base, "(no .safetensors LoRA in models/loras)", 1.0)
