"""The engine on CUDA (runs only where a CUDA device exists): the Triton kernels and the CUDA-graph
step give the same images as the eager path, for both families."""

import pytest
import torch

from bonsai_core.convert import convert_pipeline
from bonsai_core.engine import BonsaiImageEngine
from bonsai_core.quant import kernels
from bonsai_core.quant.tensor import Q1Tensor
from tests.sd_fixtures import make_tiny_sd_pipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def sd_bonsai(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    make_tiny_sd_pipeline(root / "fp")
    convert_pipeline(root / "fp", root / "bonsai", log=lambda m: None)
    return root / "bonsai"


def _generate(folder, monkeypatch, graph: str, **kw):
    monkeypatch.setenv("BONSAI_CUDA_GRAPH", graph)
    eng = BonsaiImageEngine.from_pretrained(folder, device="cuda")
    try:
        return eng.generate("a lantern", seed=3, steps=4, width=64, height=64, **kw), eng
    finally:
        eng.unload()


def test_sd_cuda_graph_step_equals_eager(sd_bonsai, monkeypatch):
    eager, _ = _generate(sd_bonsai, monkeypatch, "0")
    graphed, eng = _generate(sd_bonsai, monkeypatch, "1")
    assert eager.metadata["device"].startswith("cuda") and eager.metadata["dtype"] == "float16"
    assert torch.isfinite(graphed.tensor).all()
    assert (graphed.tensor - eager.tensor).abs().max() < 2e-3


def test_sd_cuda_uses_the_triton_path_and_matches_the_cpu(sd_bonsai, monkeypatch):
    from bonsai_core.quant import triton_q1

    if not triton_q1.available():
        pytest.skip("no Triton")
    gpu, _ = _generate(sd_bonsai, monkeypatch, "1")
    x = torch.zeros(1, 128, device="cuda", dtype=torch.float16)
    w = Q1Tensor.from_float(torch.randn(4, 128)).cuda()
    assert kernels.active(x, w) == "triton" and kernels.active(x, w, "conv2d") == "triton"
    cpu = BonsaiImageEngine.from_pretrained(sd_bonsai, device="cpu").generate(
        "a lantern", seed=3, steps=4, width=64, height=64)
    assert (gpu.tensor - cpu.tensor).abs().mean() < 2e-2  # fp16 on the GPU, fp32 on the CPU


def test_klein_cuda_graph_step_equals_eager(tmp_path, monkeypatch):
    from bonsai_core.importers.assemble import import_model
    from tests.klein_fixtures import klein_ground_truth, make_mlx_repo

    repo, _ = make_mlx_repo(tmp_path / "src", klein_ground_truth(), te="dense")
    import_model(repo, tmp_path / "klein", log=lambda m: None)
    eager, _ = _generate(tmp_path / "klein", monkeypatch, "0")
    graphed, _ = _generate(tmp_path / "klein", monkeypatch, "1")
    assert eager.metadata["dtype"] == "bfloat16"  # the klein family's dtype on CUDA
    assert torch.isfinite(graphed.tensor).all()
    assert (graphed.tensor - eager.tensor).abs().max() < 1e-2


def test_klein_on_cuda_keeps_the_token_table_on_the_host(tmp_path):
    """The klein family on CUDA looks the prompt's tokens up in host memory and drops the unread
    text-encoder layers; its prompt embedding equals diffusers' from the whole encoder on the GPU."""
    from transformers import AutoModelForCausalLM

    from bonsai_core.families.flux2_klein import HostEmbedding, _pipeline
    from bonsai_core.importers.assemble import import_model
    from tests.klein_fixtures import OUT_LAYERS, klein_ground_truth, make_mlx_repo, make_tokenizer

    repo, _ = make_mlx_repo(tmp_path / "src", klein_ground_truth(), te="dense")
    import_model(repo, tmp_path / "klein", log=lambda m: None)
    eng = BonsaiImageEngine.from_pretrained(tmp_path / "klein", device="cuda")
    try:
        te = eng.family.text_encoder
        tied = te.config.tie_word_embeddings
        assert isinstance(te.model.embed_tokens, HostEmbedding) == tied
        got = eng.family.encode(["a lantern in the snow"])
        whole = AutoModelForCausalLM.from_pretrained(tmp_path / "klein" / "text_encoder",
                                                     torch_dtype=torch.bfloat16).cuda().eval()
        with torch.no_grad():
            want = _pipeline()._get_qwen3_prompt_embeds(
                whole.model, make_tokenizer(), ["a lantern in the snow"], dtype=torch.bfloat16,
                device=torch.device("cuda"), max_sequence_length=eng.family.max_sequence_length,
                hidden_states_layers=OUT_LAYERS)
        assert got.device.type == "cuda" and torch.equal(got, want)
    finally:
        eng.unload()


def test_sd_with_a_1bit_text_encoder_runs_on_cuda(tmp_path):
    # CLIP's position_ids is a non-persistent buffer: not in the file, made on the CPU by the skeleton
    make_tiny_sd_pipeline(tmp_path / "fp")
    convert_pipeline(tmp_path / "fp", tmp_path / "b", quantize_text_encoder=True, log=lambda m: None)
    eng = BonsaiImageEngine.from_pretrained(tmp_path / "b", device="cuda")
    assert {b.device.type for b in eng.family.text_encoder.buffers()} == {"cuda"}
    assert torch.isfinite(eng.generate("a lantern", seed=1, steps=2, width=64, height=64).tensor).all()


def test_a_tiled_decode_lowers_the_decode_phase_peak_on_cuda(sd_bonsai, monkeypatch):
    """Each phase's own peak is measured on CUDA, and a budget the whole decode's estimate is over
    makes the decode tiled (``auto``), with a lower decode-phase peak than the whole decode's."""
    from bonsai_core.config import BonsaiConfig

    monkeypatch.delenv("BONSAI_VAE_TILE", raising=False)
    size = dict(seed=3, steps=2, width=512, height=512)
    runs = {}
    for name, gb in (("whole", 100.0), ("tiled", 0.05)):
        eng = BonsaiImageEngine.from_pretrained(sd_bonsai, device="cuda", config=BonsaiConfig.from_env(max_vram_gb=gb))
        eng.measure_phases = True
        try:
            runs[name] = eng.generate("a lantern", **size).metadata
        finally:
            eng.unload()
    whole, tiled = runs["whole"], runs["tiled"]
    assert whole["vae_tile"] is None and tiled["vae_tile"] == 256
    assert all(whole["phase_peak_bytes"][k] > 0 for k in ("encode", "denoise", "decode"))
    assert whole["peak_bytes"] == max(whole["phase_peak_bytes"].values())
    assert tiled["phase_peak_bytes"]["decode"] < whole["phase_peak_bytes"]["decode"]
