"""bonsai distill on a tiny teacher, on the CPU: it resumes, writes a loadable Bonsai folder whose
1-bit weights are the trained ones, and distilling brings the student closer to the teacher than
packing the teacher with no training (the naive 1-bit baseline)."""

import json

import pytest
import torch
from transformers import CLIPTextModel, CLIPTokenizer

from bonsai_core import cli
from bonsai_core.convert import convert_pipeline
from bonsai_core.distill import DistillOptions, distill, read_prompts
from bonsai_core.engine import BonsaiImageEngine
from bonsai_core.errors import BonsaiRequestError
from bonsai_core.loader import load_component, read_model_index
from bonsai_core.quant.layers import BonsaiConv2d, BonsaiLinear
from bonsai_core.scenes import scenes
from tests.test_layers import spec_q1
from training.tiny_sd import make_pipeline

FAST = dict(batch=4, pool=4, refresh=2, refresh_every=1, sample_steps=2, log_every=1, ckpt_every=1,
            device="cpu", uncond=0.5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_pipeline(tmp_path_factory.mktemp("teacher") / "tiny-teacher", "tiny", seed=3)


def _unet(folder):
    return load_component(folder, "unet", read_model_index(folder)["unet"], torch.float32)


def test_distill_resumes_and_writes_a_bonsai_folder_that_generates(teacher, tmp_path):
    dst, work = tmp_path / "student", tmp_path / "work"
    r1 = distill(teacher, dst, DistillOptions(steps=1, **FAST), work=work, echo=lambda m: None)
    assert (r1.step, r1.done) == (1, True)
    r2 = distill(teacher, dst, DistillOptions(steps=2, **FAST), work=work, echo=lambda m: None)
    assert r2.step == 2
    steps = [json.loads(ln).get("step") for ln in (work / "log.jsonl").read_text().splitlines()]
    assert [s for s in steps if s is not None] == [1, 1, 2, 2]  # step 1 ran once; the second call went on from it
    ck = torch.load(work / "distill.pt", weights_only=True)
    assert ck["step"] == 2

    # the file holds exactly the 1-bit weights of the trained float weights
    unet = _unet(dst)
    q = {n: m for n, m in unet.named_modules() if isinstance(m, (BonsaiLinear, BonsaiConv2d))}
    assert len(q) > 10 and all(".attn2." not in n for n in q)  # the default SD policy: cross-attention kept
    name = next(iter(q))
    trained = ck["student"][f"{name}.parametrizations.weight.original"]
    assert torch.equal(q[name].weight.dequantize(torch.float32), spec_q1(trained).float())
    assert json.loads((dst / "distill.json").read_text())["steps"] == 2

    eng = BonsaiImageEngine.from_pretrained(dst, device="cpu")
    a = eng.generate("a red circle on a white background", seed=4, steps=2, width=64, height=64)
    b = eng.generate("a red circle on a white background", seed=4, steps=2, width=64, height=64)
    assert a.tensor.shape == (1, 64, 64, 3) and torch.isfinite(a.tensor).all()
    assert torch.equal(a.tensor, b.tensor)


def test_distilling_brings_the_student_closer_to_the_teacher_than_naive_packing(teacher, tmp_path):
    naive = tmp_path / "naive"
    convert_pipeline(teacher, naive, log=lambda m: None)
    opts = DistillOptions(steps=12, lr=2e-3, feature_weight=0.0, **dict(FAST, refresh_every=100, pool=8, batch=8))
    distill(teacher, tmp_path / "student", opts, work=tmp_path / "w", echo=lambda m: None)
    t_unet, s_unet, n_unet = _unet(teacher), _unet(tmp_path / "student"), _unet(naive)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    tok = CLIPTokenizer.from_pretrained(teacher / "tokenizer")
    te = CLIPTextModel.from_pretrained(teacher / "text_encoder")
    ids = tok([s.caption for s in scenes(0, 16)], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ctx = te(ids)[0]
        ref = t_unet(x, t, ctx).sample
        err_student = (s_unet(x, t, ctx).sample - ref).pow(2).mean()
        err_naive = (n_unet(x, t, ctx).sample - ref).pow(2).mean()
    # 12 steps on a random tiny teacher: about 0.77 here; no training at all gives exactly 1.0
    assert err_student < 0.9 * err_naive, (float(err_student), float(err_naive))


def test_refuses_a_1bit_teacher_and_an_existing_destination(teacher, tmp_path):
    naive = tmp_path / "naive"
    convert_pipeline(teacher, naive, log=lambda m: None)
    with pytest.raises(BonsaiRequestError, match="full-precision"):
        distill(naive, tmp_path / "x", DistillOptions(steps=1, **FAST), echo=lambda m: None)
    with pytest.raises(BonsaiRequestError, match="already exists"):
        distill(teacher, naive, DistillOptions(steps=1, **FAST), echo=lambda m: None)


def test_prompt_file_and_the_command_line(teacher, tmp_path, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("# comment\na blue square on a red background\n\n  a green star on a black background \n")
    assert read_prompts(f) == ["a blue square on a red background", "a green star on a black background"]
    rc = cli.main(["distill", str(teacher), str(tmp_path / "s"), "--prompts", str(f), "--steps", "1", "--batch", "2",
                   "--pool", "2", "--sample-steps", "2", "--device", "cpu"])
    assert rc == 0
    assert "finished at step 1 of 1" in capsys.readouterr().out
    assert (tmp_path / "s" / "unet").is_dir() and (tmp_path / "s.distill-work" / "distill.pt").is_file()
