"""`bonsai convert` and `bonsai info`: whole pipelines, atomic writes, the size ratio."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bonsai_core import cli
from bonsai_core.convert import convert_pipeline
from bonsai_core.loader import load_component, read_model_index
from bonsai_core.errors import BonsaiCheckpointError
from bonsai_core.quant.layers import BonsaiLinear, plan_report, quantize_model
from bonsai_core.quant.policy import default_policy
from bonsai_core.quant.tensor import Q4Tensor
from tests.sd_fixtures import SD15_UNET_CONFIG, TINY_UNET_CONFIG, make_tiny_sd_pipeline


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    return make_tiny_sd_pipeline(tmp_path_factory.mktemp("src") / "tiny-sd")


def test_convert_writes_a_bonsai_folder_that_loads(tiny_src, tmp_path):
    result = convert_pipeline(tiny_src, tmp_path / "out", log=lambda m: None)
    index = read_model_index(tmp_path / "out")
    assert index["_bonsai"] == {"format_version": 1, "family": "sd_unet", "quantized": ["unet"]}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    unet = load_component(tmp_path / "out", "unet", index["unet"], torch.float32)
    assert any(isinstance(m, BonsaiLinear) for m in unet.modules())
    from safetensors import safe_open
    with safe_open(str(next((tmp_path / "out" / "vae").glob("*.safetensors"))), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # the VAE stays fp16
    assert result.reports["unet"].ratio < 0.5
    assert "layers quantized" in result.table() and "ratio" in result.table()


def test_converted_unet_equals_quantizing_the_source_in_memory(tiny_src, tmp_path):
    from diffusers import UNet2DConditionModel

    convert_pipeline(tiny_src, tmp_path / "out", log=lambda m: None)
    index = read_model_index(tmp_path / "out")
    loaded = load_component(tmp_path / "out", "unet", index["unet"], torch.float32)
    ref = UNet2DConditionModel.from_pretrained(tiny_src / "unet")
    quantize_model(ref, default_policy("sd_unet"))
    ref.half().float()  # the file keeps the non-quantized parts in fp16
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 5, 128)
    torch.testing.assert_close(loaded(x, t, ctx).sample, ref(x, t, ctx).sample, rtol=1e-5, atol=1e-5)


def test_text_encoder_is_quantized_only_when_asked(tiny_src, tmp_path):
    from transformers import CLIPTextModel

    result = convert_pipeline(tiny_src, tmp_path / "te", quantize_text_encoder=True, log=lambda m: None)
    index = read_model_index(tmp_path / "te")
    assert index["_bonsai"]["quantized"] == ["text_encoder", "unet"]
    te = load_component(tmp_path / "te", "text_encoder", index["text_encoder"], torch.float32)
    q4 = [m for m in te.modules() if isinstance(m, BonsaiLinear)]
    assert q4 and all(isinstance(m.weight, Q4Tensor) for m in q4)
    # every quantized weight is the round-to-nearest 4-bit code of the dense one: within half a step
    dense = CLIPTextModel.from_pretrained(tiny_src / "text_encoder").eval()
    dense_w = dict(dense.named_modules())
    for name, m in te.named_modules():
        if isinstance(m, BonsaiLinear):
            w = dense_w[name].weight.detach()
            step = m.weight.scale.float().repeat_interleave(m.weight.group_size, dim=1)
            assert ((m.weight.dequantize(torch.float32) - w).abs() <= step / 2 + 1e-3 * step + 1e-7).all(), name
    ids = torch.tensor([[1, 2, 3]])
    assert torch.isfinite(te(ids).last_hidden_state).all()
    # the table reports the embedding error, which agrees with an independent measurement
    err = result.embedding_error["text_encoder"]
    assert 0.9 < err["cos_min"] <= err["cos_mean"] < 1.0 and err["tokens"] > 0
    assert "prompt embeddings vs the dense text_encoder: cosine per token min" in result.table()
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(dense(ids).last_hidden_state, te(ids).last_hidden_state, dim=-1)
    assert cos.min() > 0.9


def test_failed_conversion_leaves_nothing_behind(tiny_src, tmp_path, monkeypatch):
    from bonsai_core import convert as convert_mod

    def fail(*a, **k):
        raise RuntimeError("simulated crash while writing")
    monkeypatch.setattr(convert_mod.checkpoint, "save_tensors", fail)
    with pytest.raises(RuntimeError):
        convert_pipeline(tiny_src, tmp_path / "out", log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_is_kept_unless_overwrite(tiny_src, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    with pytest.raises(BonsaiCheckpointError, match="already exists.*--overwrite"):
        convert_pipeline(tiny_src, tmp_path / "out", log=lambda m: None)
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep me"
    convert_pipeline(tiny_src, tmp_path / "out", overwrite=True, log=lambda m: None)
    assert not (tmp_path / "out" / "mine.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(BonsaiCheckpointError, match="no model_index.json"):
        convert_pipeline(tmp_path, tmp_path / "out")


def test_cli_convert_prints_the_table_and_info_describes_the_result(tiny_src, tmp_path, capsys):
    assert cli.main(["convert", str(tiny_src), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "layers quantized:" in out and "kept: matches policy pattern '*attn2.*'" in out and "ratio: 1/" in out
    assert cli.main(["info", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "family:  sd_unet" in out and "Bonsai Q1_0" in out and "Q1_0 tensors:" in out


def test_cli_reports_bonsai_errors_as_one_line_and_exit_2(tmp_path, capsys):
    assert cli.main(["convert", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bonsai: error:") and "model_index.json" in err


def test_plan_matches_what_quantization_really_does():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    plan = plan_report(unet, default_policy("sd_unet"))
    real = quantize_model(unet, default_policy("sd_unet"), reference_dtype=torch.float16)
    assert (plan.bytes_before, plan.bytes_after) == (real.bytes_before, real.bytes_after)


def test_sd15_shaped_unet_is_at_most_one_eighth_of_fp16():
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    plan = plan_report(unet, default_policy("sd_unet"))
    assert 1.6e9 < plan.bytes_before < 1.8e9  # SD1.5's UNet: ~860 M parameters
    assert plan.ratio <= 1 / 8, plan.table(max_rows=0)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc (Linux only)")
def test_loading_peak_ram_stays_under_1_5x_the_file(tmp_path):
    """Loading never builds full-precision quantized weights (measured in a fresh process)."""
    from diffusers import UNet2DConditionModel

    cfg = dict(TINY_UNET_CONFIG, block_out_channels=(320, 640), layers_per_block=2, cross_attention_dim=768)
    unet = UNet2DConditionModel(**cfg)
    quantize_model(unet, default_policy("sd_unet"))
    unet.half()
    from bonsai_core import checkpoint, loader
    tensors, reasons = checkpoint.model_tensors(unet)
    checkpoint.save_tensors(tmp_path / "unet" / checkpoint.WEIGHTS_NAME, tensors, family="sd_unet", component="unet")
    unet.save_config(tmp_path / "unet")
    file_size = (tmp_path / "unet" / checkpoint.WEIGHTS_NAME).stat().st_size
    fp32_size = sum(p.numel() for p in UNet2DConditionModel(**cfg).parameters()) * 4
    script = textwrap.dedent(f"""
        import torch, json
        from bonsai_core import checkpoint, loader
        from bonsai_core.loader import build_skeleton
        from pathlib import Path
        d = Path({str(tmp_path / 'unet')!r})
        build_skeleton(d, "diffusers", "UNet2DConditionModel")  # warm imports and allocator
        def rss():
            return {{l.split(':')[0]: int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(('VmRSS', 'VmHWM'))}}
        open('/proc/self/clear_refs', 'w').write('5')  # reset the high-water mark
        before = rss()['VmRSS']
        m = loader.load_into(build_skeleton(d, "diffusers", "UNet2DConditionModel"),
                                 checkpoint.read_tensors(d / checkpoint.WEIGHTS_NAME), dtype=torch.float16)
        print(json.dumps({{"peak": rss()['VmHWM'] - before}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                             [os.getcwd(), *filter(None, [os.environ.get("PYTHONPATH")])])))
    peak = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    assert fp32_size > 8 * file_size  # the test would notice a full-precision copy
    assert peak < 1.5 * file_size, f"peak {peak / 2**20:.1f} MB for a {file_size / 2**20:.1f} MB file"
