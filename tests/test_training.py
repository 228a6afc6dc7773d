"""The shipped model's tokenizer and the teacher training script (a few CPU steps, tiny config)."""

import copy
import json
import math
import shutil

import pytest
import torch
from transformers import CLIPTokenizer

from bonsai_core.engine import BonsaiImageEngine
from bonsai_core.scenes import caption_words
from training import tiny_sd, train_teacher


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return CLIPTokenizer.from_pretrained(tiny_sd.write_tokenizer(tmp_path_factory.mktemp("tok"), tiny_sd.vocabulary()))


def test_every_caption_word_is_one_token_and_prompts_count_like_sd(tok):
    for w in caption_words():
        assert len(tok(w).input_ids) == 3, w  # start, the word, end
    ids = tok("A red circle on a white background").input_ids
    assert len(ids) == 2 + 7 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[1:-1]) == "a red circle on a white background"
    padded = tok("a red circle", padding="max_length", max_length=tok.model_max_length).input_ids
    assert tok.model_max_length == 77 and len(padded) == 77 and padded[-1] == tok.eos_token_id
    # words it never saw still tokenize, byte by byte, and decode back
    ids = tok("zebra").input_ids
    assert len(ids) > 3 and tok.decode(ids[1:-1]) == "zebra"


def test_learned_merges_build_every_word_in_one_symbol():
    merges = tiny_sd.learn_merges(["red", "green", "reed"])
    symbols = {a + b for a, b in merges}
    assert {"red</w>", "green</w>", "reed</w>"} <= symbols


def test_teacher_training_resumes_and_leaves_a_teacher_that_generates(tmp_path):
    work = str(tmp_path / "w")
    common = ["--work", work, "--config", "tiny", "--device", "cpu", "--batch", "2", "--log-every", "1"]
    assert train_teacher.main(["vae", *common, "--steps", "1"])["step"] == 1
    out = train_teacher.main(["vae", *common, "--steps", "2"])
    assert out["step"] == 2 and out["done"]
    vae_cfg = json.loads((tmp_path / "w" / "vae" / "config.json").read_text())
    assert vae_cfg["scaling_factor"] == out["scaling_factor"] > 0

    unet_args = [*common, "--pool", "4", "--fresh", "2", "--ckpt-every", "1"]
    assert train_teacher.main(["unet", *unet_args, "--steps", "1"])["step"] == 1
    before = torch.load(tmp_path / "w" / "unet.pt", weights_only=True)["unet"]
    out = train_teacher.main(["unet", *unet_args, "--steps", "2"])
    assert out["step"] == 2
    log = [json.loads(ln) for ln in (tmp_path / "w" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("stage") == "unet" and "loss" in r] == [1, 2]
    after = torch.load(tmp_path / "w" / "unet.pt", weights_only=True)["unet"]
    name = "conv_in.weight"
    assert not torch.equal(before[name], after[name])  # the second call trained on from the first

    # a call with no time left still checkpoints and exports, and does not train
    out = train_teacher.main(["unet", *unet_args, "--steps", "5", "--max-seconds", "0"])
    assert out["step"] == 3  # only the one step that measures the pace

    # on another machine: a new work folder starts from the exported teacher (fresh optimizer), step 3 on
    from diffusers import UNet2DConditionModel

    teacher = tmp_path / "w" / "teacher"
    _, te, unet, _ = tiny_sd.build_components("tiny", seed=9)
    ema_unet, ema_te = copy.deepcopy(unet), copy.deepcopy(te)
    assert train_teacher.init_from_teacher(teacher, unet, te, ema_unet, ema_te) == 3
    want = UNet2DConditionModel.from_pretrained(teacher / "unet").state_dict()
    assert all(torch.equal(unet.state_dict()[k], v) and torch.equal(ema_unet.state_dict()[k], v) for k, v in want.items())
    w2 = tmp_path / "w2"
    w2.mkdir()
    shutil.copytree(tmp_path / "w" / "vae", w2 / "vae")
    out = train_teacher.main(["unet", "--work", str(w2), "--config", "tiny", "--device", "cpu", "--batch", "2",
                              "--pool", "4", "--fresh", "2", "--steps", "9", "--max-seconds", "0",
                              "--init-from", str(teacher)])
    assert out["step"] == 4  # the teacher's 3, and the one step that measures the pace

    eng = BonsaiImageEngine.from_pretrained(tmp_path / "w" / "teacher", device="cpu")
    r = eng.generate("a small red star on a blue background, top left", seed=1, steps=2, width=64, height=64)
    assert r.tensor.shape == (1, 64, 64, 3) and torch.isfinite(r.tensor).all()
    assert eng.family.count_tokens("a small red star on a blue background, top left") == 2 + 11  # the comma is a token, as in SD


def test_pyramid_noise_adds_coarse_energy_at_unit_std():
    gen = torch.Generator().manual_seed(0)
    white = torch.randn(64, 4, 64, 64, generator=gen)
    assert train_teacher.pyramid_noise(white, gen, 0.0) is white
    pyr = train_teacher.pyramid_noise(white, gen, 0.6)
    assert abs(pyr.std().item() - 1.0) < 1e-5
    # white noise averaged over 16x16 blocks has variance 1/256; the coarse levels must dominate there:
    # the coarse levels (0.6**level) add about six times the white variance there
    block = lambda n: torch.nn.functional.avg_pool2d(n, 16).var().item()  # noqa: E731
    assert block(white) < 1.5 / 256
    assert block(pyr) > 4 * block(white)
    # the fine structure is still mostly white: neighbouring latents stay weakly correlated
    corr = torch.corrcoef(torch.stack([pyr[..., :-1].flatten(), pyr[..., 1:].flatten()]))[0, 1].item()
    assert 0.05 < corr < 0.5


def test_zero_snr_alphas_are_diffusers_rescaled_schedule():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        rescale_betas_zero_snr=True).alphas_cumprod
    ours = train_teacher._sd_alphas("cpu", zero_snr=True)
    assert ours[-1].item() == 0.0 and (ours - ref).abs().max().item() < 1e-6
    assert ours[0].item() == pytest.approx(train_teacher._sd_alphas("cpu")[0].item(), rel=1e-6)  # first kept


def test_v_loss_on_hand_worked_samples():
    # a = 0 (zero SNR): v = -x0, weight 1; a = 0.8 (SNR 4): v = sqrt(.8) n - sqrt(.2) x0, weight min(5, 5) / 5 = 1;
    # a = 0.9 (SNR 9): weight 5 / 10 = 0.5
    x0, noise = torch.full((3, 1, 1, 2), 2.0), torch.full((3, 1, 1, 2), 1.0)
    a = torch.tensor([0.0, 0.8, 0.9]).view(-1, 1, 1, 1)
    pred = torch.zeros(3, 1, 1, 2)
    v = [-2.0, 0.8 ** 0.5 - 2 * 0.2 ** 0.5, 0.9 ** 0.5 - 2 * 0.1 ** 0.5]
    want = (v[0] ** 2 * 1 + v[1] ** 2 * 1 + v[2] ** 2 * 0.5) / 3
    assert train_teacher.v_loss(pred, x0, noise, a, 5.0).item() == pytest.approx(want, rel=1e-5)


def test_object_weights_and_the_weighted_v_loss_on_hand_worked_values():
    # one sample, four pixels, one of them all object: raw weights 5, 1, 1, 1 (mean 2) -> 2.5, .5, .5, .5
    cover = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4)
    w = train_teacher.object_weights(cover, 5.0)
    assert w.flatten().tolist() == pytest.approx([2.5, 0.5, 0.5, 0.5])
    assert train_teacher.object_weights(cover, 1.0) is None  # weight 1: the plain loss
    # zero SNR (a = 0): v = -x0; x0 = 2 on the object pixel, 0 elsewhere, pred 0: errors 4, 0, 0, 0
    x0 = torch.tensor([2.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4).expand(1, 2, 1, 4)  # two channels, same values
    a, pred, noise = torch.zeros(1, 1, 1, 1), torch.zeros(1, 2, 1, 4), torch.ones(1, 2, 1, 4)
    assert train_teacher.v_loss(pred, x0, noise, a, 5.0).item() == pytest.approx(4 / 4)
    assert train_teacher.v_loss(pred, x0, noise, a, 5.0, w).item() == pytest.approx(4 * 2.5 / 4)


def test_object_cover_measures_the_object_area():
    from bonsai_core import scenes as S

    sc = S.scenes(train_teacher.SEED_UNET, 8, "train", start=40)
    x, _ = train_teacher.render(train_teacher.SEED_UNET, 40, 8, 128, "cpu")
    cover = train_teacher.object_cover(sc, x, 8)
    assert cover.shape == (8, 1, 16, 16)
    checked = 0
    for i, s in enumerate(sc):
        if len(s.objects) == 1 and s.objects[0].shape in ("circle", "square"):
            o = s.objects[0]
            area = math.pi * o.r ** 2 if o.shape == "circle" else (2 * o.r) ** 2  # r: half the square's side
            assert cover[i].mean().item() == pytest.approx(area, rel=0.15)
            assert cover[i, 0, int(o.cy * 16), int(o.cx * 16)].item() == 1.0  # the centre is all object
            checked += 1
        assert cover[i].amax() <= 1 and cover[i].amin() >= 0
    assert checked == 2  # scenes 41 and 47 are single circles


def test_v_prediction_zero_snr_teacher_exports_its_schedule_and_generates(tmp_path):
    from diffusers import StableDiffusionPipeline

    work = str(tmp_path / "w")
    common = ["--work", work, "--config", "tiny", "--device", "cpu", "--batch", "2", "--log-every", "1"]
    train_teacher.main(["vae", *common, "--steps", "1"])
    unet_args = [*common, "--pool", "4", "--fresh", "2", "--steps", "1"]
    with pytest.raises(SystemExit, match="v_prediction"):
        train_teacher.main(["unet", *unet_args, "--zero-snr"])
    with pytest.raises(SystemExit, match="v_prediction"):
        train_teacher.main(["unet", *unet_args, "--object-weight", "5"])
    out = train_teacher.main(["unet", *unet_args, "--prediction", "v_prediction", "--zero-snr", "--object-weight", "5"])
    log = [json.loads(ln) for ln in (tmp_path / "w" / "log.jsonl").read_text().splitlines()]
    assert [(r["prediction"], r["zero_snr"], r["object_weight"]) for r in log
            if "loss" in r and r.get("stage") == "unet"] == [("v_prediction", True, 5.0)]
    teacher = tmp_path / "w" / "teacher"
    cfg = StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None).scheduler.config
    assert (cfg.prediction_type, cfg.rescale_betas_zero_snr, cfg.timestep_spacing) == ("v_prediction", True, "trailing")
    eng = BonsaiImageEngine.from_pretrained(teacher, device="cpu")
    r = eng.generate("a small red star on a blue background, top left", seed=1, steps=2, width=64, height=64)
    assert out["step"] == 1 and torch.isfinite(r.tensor).all()
