"""FLUX.2 [klein] end to end on tiny models: the family against diffusers' Flux2KleinPipeline,
`bonsai import` of every public layout, `bonsai convert`, GGUF export, refusals, guardrails and
where the text encoder lives."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from bonsai_core import cli, sampling
from bonsai_core.checkpoint import find_weights, read_tensors
from bonsai_core.convert import convert_pipeline
from bonsai_core.engine import BonsaiImageEngine
from bonsai_core.errors import BonsaiCheckpointError, BonsaiRequestError
from bonsai_core.families import flux2_klein as klein_mod
from bonsai_core.importers.assemble import DEFAULT_SCHEDULER_CONFIG, export_gguf, import_model
from bonsai_core.quant.layers import BonsaiLinear
from bonsai_core.quant.tensor import Q1Tensor, Q4Tensor
from tests.flux2_fixtures import packed_names
from tests.klein_fixtures import (
    OUT_LAYERS, build_pipeline, klein_ground_truth, make_full_pipeline, make_gemlite_repo, make_gguf_and_parts,
    make_mlx_repo,
)

try:  # the gguf extra: only the tests of GGUF files need it, the family's tests run without it
    import gguf  # noqa: F401
    HAVE_GGUF = True
except ImportError:
    HAVE_GGUF = False
needs_gguf = pytest.mark.skipif(not HAVE_GGUF, reason="needs the gguf extra (pip install gguf)")

try:  # the public 4-bit text encoders need the text encoder importer and its fixture writers
    import bonsai_core.importers.text_encoder  # noqa: F401
    import tests.te_fixtures  # noqa: F401
    HAVE_TE_IMPORTER = True
except ImportError:
    HAVE_TE_IMPORTER = False

SMALL = dict(steps=2, width=64, height=64)
QUIET = dict(log=lambda m: None)


@pytest.fixture(scope="module")
def gt():
    return klein_ground_truth(0)


@pytest.fixture(scope="module")
def work(tmp_path_factory, gt):
    """The imported model every test can reuse: from a GGUF file + parts when the gguf extra is
    installed, else from the MLX layout (the same transformer bits either way)."""
    root = tmp_path_factory.mktemp("klein")
    dst = root / "from-source"
    if HAVE_GGUF:
        gguf_path, parts = make_gguf_and_parts(root / "gguf", gt)
        import_model(gguf_path, dst, text_encoder=parts["text_encoder"], vae=parts["vae"],
                     tokenizer=parts["tokenizer"], **QUIET)
    else:
        gguf_path, parts = None, None
        repo, _ = make_mlx_repo(root / "mlx-source", gt, te="dense")
        import_model(repo, dst, **QUIET)
    return {"root": root, "gguf": gguf_path, "parts": parts, "bonsai": dst}


@pytest.fixture(scope="module")
def eng(work):
    return BonsaiImageEngine.from_pretrained(work["bonsai"], device="cpu")


def assert_transformer_is(folder, expected: dict):
    """The transformer file of ``folder`` holds exactly ``expected``: same bits, same dtypes."""
    cf = read_tensors(find_weights(folder / "transformer"))
    assert set(cf.tensors) == set(expected)
    for name, want in expected.items():
        got = cf.tensors[name]
        if isinstance(want, Q1Tensor):
            assert isinstance(got, Q1Tensor) and got.shape == want.shape, name
            assert torch.equal(got.qs, want.qs), name
            assert torch.equal(got.d.view(torch.int16), want.d.view(torch.int16)), name
        else:
            assert not isinstance(got, Q1Tensor), name
            assert got.dtype == want.dtype and torch.equal(got, want), name
    return cf


def no_leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")] == [] and not (parent / name).exists()


# ---------------------------------------------------------------------------------------------
# (a) the family is diffusers' Flux2KleinPipeline
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width,height,batch", [(64, 64, 1), (96, 64, 2)])
def test_family_equals_diffusers_flux2_klein_pipeline(eng, gt, width, height, batch):
    prompt = "a cat on the mat"
    ours = eng.generate(prompt, steps=3, width=width, height=height, seed=5, batch=batch, sampler="euler")
    shape = eng.family.latent_shape(width, height)
    assert shape == (128, height // 16, width // 16)  # 2x2-patched FLUX.2 latents: 128 channels at H/16 x W/16
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s))
                         for s in ours.metadata["seeds"]])
    pipe = build_pipeline(gt, seed=0)
    ref = pipe(prompt=[prompt] * batch, num_inference_steps=3, guidance_scale=1.0, width=width, height=height,
               latents=noise, output_type="pt", text_encoder_out_layers=OUT_LAYERS).images
    assert ref.shape == (batch, 3, height, width)
    assert ref.std() > 0.01  # not a degenerate picture
    torch.testing.assert_close(ours.tensor, ref.permute(0, 2, 3, 1), atol=1e-4, rtol=0)


def test_true_cfg_path_equals_diffusers_with_guidance(eng, gt):
    fam = eng.family
    steps, w, h, guidance = 2, 64, 64, 3.0
    cond, uncond = fam.encode(["a red cat"]), fam.encode([""])
    schedule = fam.schedule(steps, w, h, False)
    noise = torch.randn(fam.latent_shape(w, h), generator=torch.Generator().manual_seed(1))[None]
    with torch.inference_mode():
        latents = sampling.sample(fam.denoiser(cond, uncond, guidance, schedule, w, h), noise.clone(), schedule)
        ours = fam.decode(latents, w, h)
    pipe = build_pipeline(gt, seed=0)
    pipe.register_to_config(is_distilled=False)  # diffusers does true CFG (negative "") only then
    ref = pipe(prompt="a red cat", num_inference_steps=steps, guidance_scale=guidance, width=w, height=h,
               latents=noise, output_type="pt", text_encoder_out_layers=OUT_LAYERS).images
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def test_transformer_is_q1_0_where_bonsai_packs_and_dense_elsewhere(eng):
    modules = dict(eng.family.transformer.named_modules())
    for name in packed_names(eng.family.transformer.config):
        assert isinstance(modules[name[:-len(".weight")]], BonsaiLinear), name
    for name in ("x_embedder", "context_embedder", "proj_out", "norm_out.linear", "single_stream_modulation.linear",
                 "double_stream_modulation_img.linear", "time_guidance_embed.timestep_embedder.linear_1"):
        assert isinstance(modules[name], torch.nn.Linear), name


def test_schedule_and_refusals_of_the_family(eng):
    s = eng.family.schedule(4, 512, 512, False)
    torch.testing.assert_close(s.sigmas[:4], torch.tensor([1.0, 0.95809, 0.88398, 0.71750]), atol=1e-4, rtol=0)
    with pytest.raises(BonsaiRequestError, match="Karras"):
        eng.family.schedule(4, 512, 512, True)


# ---------------------------------------------------------------------------------------------
# (b) bonsai import of every public layout
# ---------------------------------------------------------------------------------------------
@needs_gguf
def test_import_gguf_with_parts_from_flags(work, gt, eng):
    assert_transformer_is(work["bonsai"], gt.tensors)
    index = json.loads((work["bonsai"] / "model_index.json").read_text())
    assert index["_class_name"] == "Flux2KleinPipeline" and index["_bonsai"]["family"] == "flux2_klein"
    assert index["_bonsai"]["source_layout"] == "gguf_q1" and index["_bonsai"]["quantized"] == ["transformer"]
    assert json.loads((work["bonsai"] / "scheduler" / "scheduler_config.json").read_text()) == DEFAULT_SCHEDULER_CONFIG
    a = eng.generate("a lantern", seed=0, **SMALL)
    b = eng.generate("a lantern", seed=0, **SMALL)
    assert torch.isfinite(a.tensor).all() and a.tensor.shape == (1, 64, 64, 3)
    assert torch.equal(a.tensor, b.tensor)


@pytest.mark.parametrize("layout", ["gemlite", "mlx"])
def test_import_public_repo_folders_with_the_cli(work, gt, layout, capsys):
    te = ("hqq" if layout == "gemlite" else "mlx") if HAVE_TE_IMPORTER else "dense"
    make = make_gemlite_repo if layout == "gemlite" else make_mlx_repo
    repo, te_truth = make(work["root"] / f"repo-{layout}", gt, te=te)
    dst = work["root"] / f"from-{layout}"
    assert cli.main(["import", str(repo), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "packed Q1_0" in out and f"wrote {dst}" in out
    assert_transformer_is(dst, gt.tensors)
    index = json.loads((dst / "model_index.json").read_text())
    assert index["_bonsai"]["source_layout"] == layout
    assert index["text_encoder"] == ["transformers", "Qwen3ForCausalLM"]
    e = BonsaiImageEngine.from_pretrained(dst, device="cpu")
    if te_truth is not None:  # the 4-bit text encoder arrives 4-bit, every value exact
        assert any("kept 4-bit" in n for n in index["_bonsai"]["notes"])
        w = e.family.text_encoder.state_dict()["model.layers.0.mlp.down_proj.weight"]
        assert isinstance(w, Q4Tensor)
        assert torch.equal(w.dequantize(torch.float64), te_truth["model.layers.0.mlp.down_proj.weight"].double())
    r1 = e.generate("a lantern", seed=3, **SMALL)
    r2 = e.generate("a lantern", seed=3, **SMALL)
    assert torch.isfinite(r1.tensor).all() and torch.equal(r1.tensor, r2.tensor)


def test_import_unpacked_pipeline_folder(work, gt):
    src = make_full_pipeline(work["root"] / "unpacked-repo", gt=gt)  # a diffusers folder, dense transformer
    dst = work["root"] / "from-unpacked"
    import_model(src, dst, **QUIET)
    cf = read_tensors(find_weights(dst / "transformer"))
    for name, want in gt.tensors.items():  # fp32 source: packed bits the same, dense values the same
        got = cf.tensors[name]
        if isinstance(want, Q1Tensor):
            assert isinstance(got, Q1Tensor) and torch.equal(got.qs[1:], want.qs[1:]), name
            assert torch.equal(got.dequantize(torch.float32), want.dequantize(torch.float32)), name
        else:
            assert torch.equal(got.float(), want.float()), name
    assert BonsaiImageEngine.from_pretrained(dst, device="cpu").generate("x", seed=1, **SMALL).tensor.isfinite().all()


# ---------------------------------------------------------------------------------------------
# (c) bonsai convert of a full-precision klein pipeline
# ---------------------------------------------------------------------------------------------
def test_convert_full_precision_klein_with_the_flux2_policy(work, gt):
    src = work["root"] / "unpacked-repo"
    if not src.exists():
        make_full_pipeline(src, gt=gt)
    dst = work["root"] / "converted"
    convert_pipeline(src, dst, **QUIET)
    assert (dst / "bonsai.json").read_text() == (src / "bonsai.json").read_text()  # top-level files carried
    cf = read_tensors(find_weights(dst / "transformer"))
    assert cf.family == "flux2_klein" and cf.policy["name"] == "flux2_klein_default"
    packed = {n for n, t in cf.tensors.items() if isinstance(t, Q1Tensor)}
    assert packed == set(packed_names(gt.config))
    for kept in ("x_embedder.weight", "context_embedder.weight", "proj_out.weight", "norm_out.linear.weight",
                 "double_stream_modulation_img.linear.weight", "single_stream_modulation.linear.weight",
                 "time_guidance_embed.timestep_embedder.linear_2.weight"):
        assert cf.meta["tensors"][kept]["type"] in ("F16", "BF16", "F32"), kept
    # the ground truth's block linears are sign x scale already: Q1_0 reproduces them exactly
    for name in packed:
        torch.testing.assert_close(cf.tensors[name].dequantize(torch.float32),
                                   gt.tensors[name].dequantize(torch.float32), atol=0, rtol=0)
    r = BonsaiImageEngine.from_pretrained(dst, device="cpu").generate("a bonsai", seed=0, **SMALL)
    assert torch.isfinite(r.tensor).all()


# ---------------------------------------------------------------------------------------------
# (d) export-gguf -> import is bit exact
# ---------------------------------------------------------------------------------------------
@needs_gguf
def test_export_gguf_then_import_round_trip_is_bit_exact(work, eng, capsys):
    model = work["bonsai"]
    out = work["root"] / "exported.gguf"
    assert cli.main(["export-gguf", str(model), str(out)]) == 0
    assert cli.main(["export-gguf", str(model), str(out)]) == 2  # exists: refused
    assert "already exists" in capsys.readouterr().err
    dst = work["root"] / "re-imported"
    assert cli.main(["import", str(out), str(dst), "--text-encoder", str(model / "text_encoder"),
                     "--vae", str(model / "vae"), "--tokenizer", str(model / "tokenizer"),
                     "--scheduler", str(model / "scheduler")]) == 0
    first = read_tensors(find_weights(model / "transformer"))
    assert_transformer_is(dst, first.tensors)
    assert json.loads((dst / "transformer" / "config.json").read_text()) == json.loads(
        (model / "transformer" / "config.json").read_text())
    shutil.copy2(model / "bonsai.json", dst / "bonsai.json")
    again = BonsaiImageEngine.from_pretrained(dst, device="cpu").generate("a lantern", seed=0, **SMALL)
    assert torch.equal(again.tensor, eng.generate("a lantern", seed=0, **SMALL).tensor)


def test_export_refuses_a_full_precision_folder(work, gt):
    src = work["root"] / "unpacked-repo"
    if not src.exists():
        make_full_pipeline(src, gt=gt)
    with pytest.raises(BonsaiCheckpointError, match="bonsai convert"):
        export_gguf(src, work["root"] / "fp.gguf", **QUIET)
    assert not (work["root"] / "fp.gguf").exists()


# ---------------------------------------------------------------------------------------------
# (e) refusals leave nothing behind
# ---------------------------------------------------------------------------------------------
@needs_gguf
def test_missing_vae_names_the_flag(work, tmp_path):
    p = work["parts"]
    with pytest.raises(BonsaiCheckpointError, match=r"missing vae.*--vae"):
        import_model(work["gguf"], tmp_path / "m", text_encoder=p["text_encoder"], tokenizer=p["tokenizer"], **QUIET)
    assert no_leftovers(tmp_path, "m")
    assert cli.main(["import", str(work["gguf"]), str(tmp_path / "m")]) == 2
    assert no_leftovers(tmp_path, "m")


@needs_gguf
def test_truncated_transformer_is_refused_and_nothing_is_written(work, tmp_path):
    p = work["parts"]
    bad = tmp_path / "cut.gguf"
    data = work["gguf"].read_bytes()
    bad.write_bytes(data[: len(data) - 1000])
    with pytest.raises(BonsaiCheckpointError):
        import_model(bad, tmp_path / "m", text_encoder=p["text_encoder"], vae=p["vae"], tokenizer=p["tokenizer"],
                     **QUIET)
    assert no_leftovers(tmp_path, "m")


@needs_gguf
def test_wrong_layout_is_refused(work, tmp_path):
    p = work["parts"]
    with pytest.raises(BonsaiCheckpointError):
        import_model(work["gguf"], tmp_path / "m", layout="mlx", text_encoder=p["text_encoder"], vae=p["vae"],
                     tokenizer=p["tokenizer"], **QUIET)
    assert no_leftovers(tmp_path, "m")


@needs_gguf
def test_failure_after_the_transformer_leaves_nothing(work, tmp_path):
    p = work["parts"]
    tok = tmp_path / "tok-no-template"
    shutil.copytree(p["tokenizer"], tok)
    (tok / "chat_template.jinja").unlink()
    with pytest.raises(BonsaiCheckpointError, match="chat template"):
        import_model(work["gguf"], tmp_path / "m", text_encoder=p["text_encoder"], vae=p["vae"], tokenizer=tok,
                     **QUIET)
    assert no_leftovers(tmp_path, "m")


@needs_gguf
def test_existing_destination_is_refused_unless_overwrite(work, tmp_path):
    p = work["parts"]
    dst = tmp_path / "m"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    kw = dict(text_encoder=p["text_encoder"], vae=p["vae"], tokenizer=p["tokenizer"], **QUIET)
    with pytest.raises(BonsaiCheckpointError, match="already exists"):
        import_model(work["gguf"], dst, **kw)
    assert (dst / "keep.txt").read_text() == "mine"
    import_model(work["gguf"], dst, overwrite=True, **kw)
    assert not (dst / "keep.txt").exists() and (dst / "model_index.json").is_file()
    assert [q.name for q in tmp_path.iterdir() if q.name.startswith(".")] == []


def test_bad_text_encoder_out_layers_are_refused(work, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(work["bonsai"], dst)
    (dst / "bonsai.json").unlink()  # default (9, 18, 27) on a 3-layer encoder
    with pytest.raises(BonsaiCheckpointError, match="3 layers"):
        BonsaiImageEngine.from_pretrained(dst, device="cpu")


# ---------------------------------------------------------------------------------------------
# (f) guardrail counts klein tokens against 512
# ---------------------------------------------------------------------------------------------
def test_guardrail_counts_chat_templated_tokens_against_512(eng):
    fam = eng.family
    assert fam.defaults.max_tokens == 512
    text = fam.tokenizer().apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=False)
    assert fam.count_tokens("a cat") == len(fam.tokenizer()(text).input_ids) > len(fam.tokenizer()("a cat").input_ids)
    long = "x y " * 150  # 600 byte-level tokens before the template
    assert fam.count_tokens(long) > 600
    report = eng.check(long, width=64, height=64, steps=4, mode="warn")
    assert any("512" in w for w in report.warnings)
    with pytest.raises(BonsaiRequestError, match="512"):
        eng.generate(long, guardrail="refuse", **SMALL)
    clamped = eng.check(long, width=64, height=64, steps=4, mode="clamp")
    assert fam.count_tokens(clamped.request.prompt) <= 512


# ---------------------------------------------------------------------------------------------
# (g) the text encoder is not on the device while denoising
# ---------------------------------------------------------------------------------------------
def test_text_encoder_is_kept_out_of_the_denoising_set(eng):
    fam = eng.family
    assert set(fam.denoising_modules()) == {"transformer", "vae"}
    assert set(fam.modules()) == {"text_encoder", "transformer", "vae"}
    fam.encode(["a fresh prompt for the cache"])
    assert all(p.device.type == "cpu" for p in fam.text_encoder.parameters())


def test_encode_lends_the_text_encoder_to_cuda_from_host_memory_and_parks_it_after(eng, monkeypatch):
    """The branch CUDA takes: a real module, lent through HostParked for the forward, parked after,
    the same host copy reused for the next prompt."""
    fam = eng.family

    class Parked:  # stands in for HostParked: this machine has no CUDA to lend to
        made = []

        def __init__(self, module):
            self.module, self.events = module, []
            Parked.made.append(self)

        def lend(self, device):
            self.events.append(("lend", device))

        def park(self):
            self.events.append("park")

    class FakePipe:
        @staticmethod
        def _get_qwen3_prompt_embeds(te, tok, prompts, **kw):
            FakePipe.seen = (te, list(Parked.made[-1].events), kw["device"], kw["hidden_states_layers"],
                             kw["max_sequence_length"])
            return torch.zeros(1, 512, 192)

    cuda = torch.device("cuda")
    monkeypatch.setattr(klein_mod, "HostParked", Parked)
    monkeypatch.setattr(klein_mod, "_pipeline", lambda: FakePipe)
    monkeypatch.setattr(fam, "device", cuda)
    monkeypatch.setattr(fam, "_te_parked", None)
    monkeypatch.setattr(fam, "_fits_on_device", lambda nbytes: True)
    fam._encode("anything")
    stack, *rest = FakePipe.seen
    # lent during the forward; the decoder stack runs alone, keeping the hidden states it reads
    assert stack.stack is fam.text_encoder.model and stack.read == OUT_LAYERS
    assert rest == [[("lend", cuda)], cuda, OUT_LAYERS, 512]
    assert len(Parked.made) == 1 and Parked.made[0].module is fam.text_encoder
    assert Parked.made[0].events == [("lend", cuda), "park"]
    fam._encode("another prompt")
    assert len(Parked.made) == 1 and Parked.made[0].events[2:] == [("lend", cuda), "park"]  # one host copy

    # a text encoder bigger than the free device memory is streamed layer by layer instead
    import accelerate
    offloaded = []
    monkeypatch.setattr(fam, "_fits_on_device", lambda nbytes: False)
    monkeypatch.setattr(accelerate, "cpu_offload", lambda m, execution_device: offloaded.append(execution_device))
    fam._encode("a third prompt")
    assert offloaded == [cuda] and len(Parked.made[0].events) == 4 and fam._te_offloaded
    fam._te_offloaded = False


def test_encode_moves_the_text_encoder_to_mps_and_back(eng, monkeypatch):
    """Elsewhere than CUDA (Apple MPS) the module itself moves for the forward and back after."""
    fam = eng.family

    class FakeTE:
        def __init__(self):
            self.where, self.moves = "cpu", []

        def to(self, device):
            self.where = str(device)
            self.moves.append(self.where)
            return self

    class FakePipe:
        @staticmethod
        def _get_qwen3_prompt_embeds(te, tok, prompts, **kw):
            FakePipe.seen = te.stack.where
            return torch.zeros(1, 512, 192)

    fake = FakeTE()
    monkeypatch.setattr(fam, "text_encoder", fake)
    monkeypatch.setattr(fam, "device", torch.device("mps"))
    monkeypatch.setattr(klein_mod, "_pipeline", lambda: FakePipe)
    monkeypatch.setattr(klein_mod.devices, "free_cache", lambda device: None)
    monkeypatch.setattr("bonsai_core.quant.layers.module_nbytes", lambda m: 2**30)
    fam._encode("anything")
    assert FakePipe.seen == "mps" and fake.moves == ["mps", "cpu"] and fake.where == "cpu"


def test_import_by_hub_repo_id_reads_the_cache_in_offline_mode(work, gt, tmp_path, monkeypatch, capsys):
    import shutil

    repo, _ = make_mlx_repo(work["root"] / "repo-hub", gt, te="dense")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"
    assert cli.main(["import", "prism-ml/tiny-klein-mlx", str(tmp_path / "a"), "--cache-dir", str(cache)]) == 2
    assert "offline mode" in capsys.readouterr().err
    commit = "fedcba9876543210fedcba9876543210fedcba98"  # the cache layout huggingface_hub reads
    shutil.copytree(repo, cache / "models--prism-ml--tiny-klein-mlx" / "snapshots" / commit)
    (cache / "models--prism-ml--tiny-klein-mlx" / "refs").mkdir()
    (cache / "models--prism-ml--tiny-klein-mlx" / "refs" / "main").write_text(commit)
    assert cli.main(["import", "prism-ml/tiny-klein-mlx", str(tmp_path / "b"), "--cache-dir", str(cache)]) == 0
    assert_transformer_is(tmp_path / "b", gt.tensors)


def test_vae_in_another_layout_is_refused_at_import(work, gt, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    repo, _ = make_mlx_repo(work["root"] / "repo-badvae", gt, te="dense")
    vae_file = next((repo / "vae").glob("*.safetensors"))
    tensors = load_file(str(vae_file))
    conv = next(k for k, v in tensors.items() if v.dim() == 4 and v.shape[2] == 3)
    tensors[conv] = tensors[conv].permute(0, 2, 3, 1).contiguous()  # channels-last, as MLX stores convs
    save_file(tensors, str(vae_file))
    with pytest.raises(BonsaiCheckpointError, match=f"not in diffusers' AutoencoderKLFlux2 layout.*{conv}"):
        import_model(repo, tmp_path / "out", **QUIET)
    assert not (tmp_path / "out").exists()
    shutil.rmtree(repo)


def test_host_parked_module_lends_its_weights_and_takes_them_back_without_copies():
    from bonsai_core.families.flux2_klein import HostParked

    m = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    ref = m(x)
    parked = HostParked(m)
    host = [m.weight.data_ptr(), m.bias.data_ptr()]
    parked.lend(torch.device("meta"))  # stands in for the GPU: the module's slots hold the lent copies
    assert m.weight.device.type == "meta" and m.bias.device.type == "meta"
    assert isinstance(m.weight, torch.nn.Parameter)
    parked.park()
    assert [m.weight.data_ptr(), m.bias.data_ptr()] == host  # the same host memory, no copy back
    assert torch.equal(m(x), ref)


def test_engine_runs_true_cfg_on_klein_only_when_asked(eng):
    plain = eng.generate("a red cat", seed=4, guidance=3.0, **SMALL)
    assert plain.metadata["cfg"] is False and plain.metadata["negative_prompt"] == ""
    cfg = eng.generate("a red cat", "blurry", seed=4, guidance=3.0, true_cfg=True, **SMALL)
    assert cfg.metadata["cfg"] is True and cfg.metadata["negative_prompt"] == "blurry"
    assert not torch.equal(plain.tensor, cfg.tensor)
    same = eng.generate("a red cat", "blurry", seed=4, guidance=1.0, true_cfg=True, **SMALL)
    assert same.metadata["cfg"] is False and torch.equal(same.tensor, plain.tensor)  # guidance 1: one pass


@needs_gguf
def test_engine_points_a_public_payload_at_bonsai_import(work):
    with pytest.raises(BonsaiCheckpointError, match="public 'gguf_q1' layout.*bonsai import"):
        BonsaiImageEngine.from_pretrained(work["gguf"], device="cpu")


def test_convert_with_a_4bit_tied_text_encoder_stores_the_tie_once_and_loads(work, gt, tmp_path):
    src = work["root"] / "unpacked-repo"
    if not src.exists():
        make_full_pipeline(src, gt=gt)
    dst = tmp_path / "te4bit"
    result = convert_pipeline(src, dst, quantize_text_encoder=True, **QUIET)
    err = result.embedding_error["text_encoder"]  # Qwen3: the hidden states klein reads, side by side
    assert err["output"].startswith("hidden states") and 0.9 < err["cos_min"] <= err["cos_mean"] < 1.0
    cf = read_tensors(find_weights(dst / "text_encoder"))
    assert cf.meta["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "lm_head.weight" not in cf.tensors
    e = BonsaiImageEngine.from_pretrained(dst, device="cpu")
    te = e.family.text_encoder
    assert te.lm_head.weight is te.model.embed_tokens.weight  # tied again, one tensor in memory
    assert any(isinstance(m, BonsaiLinear) and isinstance(m.weight, Q4Tensor) for m in te.modules())
    assert torch.isfinite(e.generate("a lantern", seed=0, **SMALL).tensor).all()


def test_cli_info_config_for_a_klein_model_shows_what_klein_runs(work, monkeypatch, capsys):
    for var in ("BONSAI_STEPS", "BONSAI_SAMPLER", "BONSAI_GUIDANCE", "BONSAI_WIDTH"):
        monkeypatch.delenv(var, raising=False)
    assert cli.main(["info", str(work["bonsai"]), "--config"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "4" in lines["steps"] and "24" not in lines["steps"] and lines["steps"].endswith("flux2_klein family default")
    assert "'euler'" in lines["sampler"] and "dpmpp_2m" not in lines["sampler"]
    assert "1.0" in lines["guidance"] and "1024" in lines["width"]


def test_a_resident_text_encoder_is_used_in_place_and_parked_after_a_run_over_the_budget(eng, monkeypatch):
    """placement.py said RESIDENT: the encode neither lends nor moves it; a run measured over the budget
    (engine -> observe_peak) moves it to host memory for the next runs."""
    from bonsai_core.placement import RESIDENT, Placement

    fam = eng.family
    seen = []

    class FakePipe:
        @staticmethod
        def _get_qwen3_prompt_embeds(te, tok, prompts, **kw):
            seen.append(te.stack)
            return torch.zeros(1, 512, 192)

    def no_lending(module):
        raise AssertionError("a resident text encoder is not lent")

    moves = []
    monkeypatch.setattr(klein_mod, "HostParked", no_lending)
    monkeypatch.setattr(klein_mod, "_pipeline", lambda: FakePipe)
    monkeypatch.setattr(klein_mod.devices, "free_cache", lambda d: None)
    monkeypatch.setattr(fam, "device", torch.device("cuda"))
    monkeypatch.setattr(fam, "te_placement", Placement(RESIDENT, "fits"))
    monkeypatch.setattr(fam, "max_device_bytes", 4 * 2**30)
    monkeypatch.setattr(fam, "_te_demoted", False)
    monkeypatch.setattr(fam.text_encoder, "to", lambda device: moves.append(str(device)))
    fam._encode("a resident prompt")
    assert seen == [fam.text_encoder.model] and moves == []
    assert fam.observe_peak(int(3.9 * 2**30)) is None and fam.te_resident
    msg = fam.observe_peak(int(4.5 * 2**30))
    assert "measured peak 4.50 GiB" in msg and moves == ["cpu"] and not fam.te_resident


def test_a_parked_text_encoder_is_kept_on_the_device_after_a_run_that_leaves_room_and_not_after_a_demotion(
        eng, monkeypatch):
    """Measurement corrects the load-time estimate both ways: parked, a run whose peak + the encoder's
    measured bytes fits the budget brings it onto the device; a later run over the budget parks it
    again, for good."""
    from bonsai_core.placement import PARKED, Placement

    fam = eng.family
    moves = []
    monkeypatch.setattr(klein_mod.devices, "free_cache", lambda d: None)
    monkeypatch.setattr(fam, "device", torch.device("cuda"))
    monkeypatch.setattr(fam, "te_placement", Placement(PARKED, "the estimate said no"))
    monkeypatch.setattr(fam, "max_device_bytes", 6 * 2**30)
    monkeypatch.setattr(fam, "_te_device_bytes", int(1.54 * 2**30))
    monkeypatch.setattr(fam, "_te_demoted", False)  # the module's engine is shared with the tests above
    monkeypatch.setattr(fam, "_te_offloaded", False)
    monkeypatch.setattr(fam, "_te_promoted", False)
    monkeypatch.setattr(fam.text_encoder, "to", lambda device: moves.append(str(device)))
    device_free = [80 * 2**30]  # what the card has free; the process holds nothing more
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (device_free[0], 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    parked_model = fam.memory_model(cfg=False)
    assert fam.observe_peak(int(4.5 * 2**30)) is None and moves == [] and not fam.te_resident  # 6.04 > 5.7
    device_free[0] = 5 * 2**30  # another program holds the rest of the card: 5.12 > 0.95 x 5
    assert fam.observe_peak(int(3.58 * 2**30)) is None and moves == [] and not fam.te_resident
    device_free[0] = 80 * 2**30
    assert fam.observe_peak(int(3.58 * 2**30)) is None and moves == ["cuda"] and fam.te_resident
    # the guardrails estimate it as the parked encoder the run measured, not as resident at load
    promoted_model = fam.memory_model(cfg=False)
    assert (promoted_model.resident_bytes, promoted_model.lent_bytes) == (parked_model.resident_bytes,
                                                                          parked_model.lent_bytes)
    assert "over the budget" in fam.observe_peak(int(6.5 * 2**30)) and moves == ["cuda", "cpu"]
    assert fam.observe_peak(int(1 * 2**30)) is None and moves == ["cuda", "cpu"] and not fam.te_resident


def test_place_text_encoder_leaves_a_cpu_run_alone(eng, monkeypatch):
    fam = eng.family
    monkeypatch.setattr(fam, "max_device_bytes", None)
    fam.place_text_encoder(4 * 2**30, lambda: 0)
    assert fam.te_placement is None and fam.observe_peak(10 * 2**30) is None
    assert {p.device.type for p in fam.text_encoder.parameters()} == {"cpu"}


def test_the_memory_model_counts_a_resident_text_encoder_in_every_phase_and_a_lent_one_in_the_encode(eng, monkeypatch):
    from bonsai_core.placement import PARKED, RESIDENT, Placement
    from bonsai_core.quant.layers import module_nbytes

    fam = eng.family
    te = module_nbytes(fam.text_encoder)
    monkeypatch.setattr(fam, "device", torch.device("cuda"))
    monkeypatch.setattr(fam, "te_placement", Placement(PARKED, "does not fit"))
    lent = fam.memory_model(cfg=False)
    assert (lent.resident_bytes, lent.lent_bytes) == (fam.weight_bytes(), te)
    monkeypatch.setattr(fam, "te_placement", Placement(RESIDENT, "fits"))
    resident = fam.memory_model(cfg=False)
    assert (resident.resident_bytes, resident.lent_bytes) == (fam.weight_bytes() + te, 0)
    # the denoise and decode phases hold it too, the encode phase the same bytes as when lent
    for phase, value in resident.phases(64, 64, 1).items():
        assert value == lent.phases(64, 64, 1)[phase] + (0 if phase == "encode" else te), phase


def test_placement_sets_the_measured_text_encoder_beside_a_run_estimated_without_it(work, eng, monkeypatch):
    """``placement.place_text_encoder`` adds the text encoder's measured bytes to the run's estimate,
    so that estimate must not hold the text encoder already (it would count twice and park an encoder
    that fits)."""
    from bonsai_core.guardrails import estimate_memory_bytes
    from bonsai_core.quant.layers import module_nbytes

    fam = eng.family
    monkeypatch.setattr(fam, "device", torch.device("cuda"))
    lent = fam.memory_model(cfg=False)
    without = fam.memory_model(cfg=False, text_encoder=False)
    assert lent.lent_bytes == module_nbytes(fam.text_encoder) > 0
    assert (without.resident_bytes, without.lent_bytes) == (fam.weight_bytes(), 0)
    # what the engine hands the family at load: the estimate of a run without the text encoder's weights
    seen = []
    monkeypatch.setattr(type(fam), "place_text_encoder", lambda self, budget, run_bytes: seen.append(
        (run_bytes(), estimate_memory_bytes(self.memory_model(cfg=False, text_encoder=False), width=1024,
                                            height=1024, batch=1),
         estimate_memory_bytes(self.memory_model(cfg=False), width=1024, height=1024, batch=1))))
    BonsaiImageEngine.from_pretrained(work["bonsai"], device="cpu")
    (given, without_te, with_te), = seen
    assert given == without_te < with_te


@pytest.mark.parametrize("out_layers,dropped", [((2, 4), 2), ((1, 3, 5), 1), ((6,), 0), ((2, -1), 0)])
def test_unread_text_encoder_layers_are_dropped_and_the_embedding_is_unchanged(out_layers, dropped):
    """The prompt embedding after dropping the layers past the deepest one it reads (and the final
    norm) equals diffusers' embedding from the whole text encoder, bit for bit."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from bonsai_core.families.flux2_klein import _pipeline, drop_unread_layers
    from tests.klein_fixtures import TE_CONFIG, make_tokenizer

    torch.manual_seed(0)
    te = Qwen3ForCausalLM(Qwen3Config(**{**TE_CONFIG, "num_hidden_layers": 6})).eval()
    tok = make_tokenizer()

    def embed(model):
        with torch.no_grad():
            return _pipeline()._get_qwen3_prompt_embeds(model.model, tok, ["a red cat on a mat"], dtype=torch.float32,
                                                       device=torch.device("cpu"), max_sequence_length=32,
                                                       hidden_states_layers=out_layers)

    want = embed(te)
    assert drop_unread_layers(te, out_layers) == dropped
    assert len(te.model.layers) == te.config.num_hidden_layers == 6 - dropped
    assert isinstance(te.model.norm, torch.nn.Identity) == (dropped > 0)
    assert torch.equal(embed(te), want)


@pytest.mark.parametrize("out_layers,drop", [((1, 3, 5), False), ((2, 4), True), ((0, 6), False), ((-1, 2, -7), False),
                                            ((6, 3), True), ((6, -1, 2), False)])
def test_reading_only_the_embedding_hidden_states_gives_diffusers_embedding(out_layers, drop):
    """The encode keeps only the hidden states it reads (forward hooks) instead of asking transformers
    for all of them; the prompt embedding equals diffusers' from the whole list, bit for bit: the token
    embeddings (0), inner layers, the last (after the final norm), negative numbers, with the unread
    layers dropped or not, two numbers for one state. The wrapper hands back just the states asked
    for, and a number past the encoder is refused with the setting to change."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from bonsai_core.errors import BonsaiCheckpointError
    from bonsai_core.families.flux2_klein import ReadHiddenStates, _pipeline, drop_unread_layers
    from tests.klein_fixtures import TE_CONFIG, make_tokenizer

    torch.manual_seed(0)
    te = Qwen3ForCausalLM(Qwen3Config(**{**TE_CONFIG, "num_hidden_layers": 6})).eval()
    with torch.no_grad():
        te.model.norm.weight.uniform_(0.5, 1.5)  # a final norm that is not the identity
    tok = make_tokenizer()

    def embed(model):
        with torch.no_grad():
            return _pipeline()._get_qwen3_prompt_embeds(model, tok, ["a red cat on a mat"], dtype=torch.float32,
                                                       device=torch.device("cpu"), max_sequence_length=32,
                                                       hidden_states_layers=out_layers)

    want = embed(te.model)
    if drop:
        drop_unread_layers(te, out_layers)
    reader = ReadHiddenStates(te.model, out_layers)
    assert torch.equal(embed(reader), want)
    with torch.no_grad():
        ids = torch.ones(1, 8, dtype=torch.long)
        assert set(reader(input_ids=ids, attention_mask=torch.ones_like(ids)).hidden_states) == set(out_layers)
        for bad in ((2, 9), (-9,)):
            with pytest.raises(BonsaiCheckpointError, match=r"^/x/m: .*hidden states 0 to \d+.*text_encoder_out_layers"):
                ReadHiddenStates(te.model, bad, "/x/m")(input_ids=ids, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("packed", [False, True])
def test_the_embedding_table_stays_on_the_host_and_the_embedding_is_unchanged(packed):
    """On CUDA the token table stays in host memory (a lookup sends only the prompt's rows): the
    module's parameters no longer hold it, moving the module leaves it on the host, and the prompt
    embedding equals diffusers' from the untouched encoder bit for bit (the meta device stands in for
    the GPU where only the move is checked)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from bonsai_core.families.flux2_klein import HostEmbedding, _pipeline, embedding_to_host
    from bonsai_core.quant.layers import module_nbytes, quantize_model
    from bonsai_core.quant.policy import text_encoder_policy
    from tests.klein_fixtures import TE_CONFIG, make_tokenizer

    torch.manual_seed(0)
    te = Qwen3ForCausalLM(Qwen3Config(**{**TE_CONFIG, "tie_word_embeddings": True})).eval()
    if packed:
        quantize_model(te, text_encoder_policy())
    tok = make_tokenizer()

    def embed(model):
        with torch.no_grad():
            return _pipeline()._get_qwen3_prompt_embeds(model.model, tok, ["a red cat on a mat"], dtype=torch.float32,
                                                       device=torch.device("cpu"), max_sequence_length=32,
                                                       hidden_states_layers=(1, 2, 3))

    want, before = embed(te), module_nbytes(te)
    table = te.model.embed_tokens.weight
    moved = embedding_to_host(te)
    assert isinstance(te.model.embed_tokens, HostEmbedding) and moved > 0
    assert module_nbytes(te) == before - moved and all(p is not table for p in te.parameters())
    assert torch.equal(embed(te), want)
    te.to("meta")
    assert te.model.embed_tokens.table.device.type == "cpu"


def test_an_untied_head_keeps_its_embedding_in_place():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from bonsai_core.families.flux2_klein import embedding_to_host
    from tests.klein_fixtures import TE_CONFIG

    te = Qwen3ForCausalLM(Qwen3Config(**{**TE_CONFIG, "tie_word_embeddings": False}))
    assert embedding_to_host(te) == 0 and isinstance(te.model.embed_tokens, torch.nn.Embedding)


def test_host_parked_frees_each_original_before_pinning_the_next(monkeypatch):
    """Parking pins one tensor at a time and puts the copy in place before the next: host memory
    never holds the text encoder twice (the first version pinned everything, then swapped). Ties stay
    tied. Pinning is stood in for by a copy (this machine has no CUDA to pin for)."""
    import gc
    import weakref

    from bonsai_core.families.flux2_klein import HostParked

    m = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
    m[3].weight = m[0].weight  # tied
    refs = []

    def pinned(t):
        gc.collect()
        assert all(r() is None for r in refs), "an original outlived its pinned copy"
        refs.append(weakref.ref(t))
        copy = t.detach().clone()
        return torch.nn.Parameter(copy, requires_grad=False) if isinstance(t, torch.nn.Parameter) else copy

    monkeypatch.setattr(HostParked, "_pinned", staticmethod(pinned))
    parked = HostParked(m)
    gc.collect()
    assert len(refs) == 7 and all(r() is None for r in refs)  # 4 weights (one tied) + 4 biases - 1
    assert m[3].weight is m[0].weight
    parked.lend(torch.device("meta"))
    assert m[3].weight is m[0].weight and m[0].weight.device.type == "meta"
