"""The teacher pretrained at a lower resolution (``train_teacher.py unet --resolution N``), then trained on
at the config's: the scenes are the same at any size, the run resumes across resolutions, and the
exported teacher stays a model of the config's resolution (tiny config, a few CPU steps)."""

import json

import pytest
import torch
import torch.nn.functional as F

from bonsai_core import scenes as S
from bonsai_core.config import FAMILY_DEFAULTS
from training import tiny_sd, train_teacher


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _colour(name: str) -> torch.Tensor:
    return torch.tensor(S.PALETTE[name], dtype=torch.float32) / 255


def _object_weight(img: torch.Tensor, background: str) -> torch.Tensor:
    """Each pixel's distance from the background colour (0 on the background, the object's contrast
    inside it, in between on an anti-aliased edge): where the objects are, and how much of them."""
    return (img - _colour(background).view(3, 1, 1)).abs().amax(0)


def test_a_scene_is_the_same_scene_at_256_and_512_and_its_caption_does_not_depend_on_size():
    batch = S.scenes(7, 40, start=0, two_objects=0.5)
    assert {o.shape for s in batch for o in s.objects} == set(S.SHAPES)  # every shape is checked
    lo, hi = S.render_batch(batch, 256), S.render_batch(batch, 512)
    # the 512 render box-filtered to 256 is the 256 render except along the one-pixel anti-aliased edges
    diff = (F.avg_pool2d(hi, 2) - lo).abs().amax(1)
    assert diff.mean() < 0.01
    assert (diff > 0.1).float().mean() < 0.02
    for s, a, b in zip(batch, lo, hi):
        wa, wb = _object_weight(a, s.background), _object_weight(b, s.background)
        assert wa.sum() > 0
        # the same share of the picture covered, centred at the same place (fractions of the side)
        assert abs(wa.mean() - wb.mean()) < 0.01 * wb.mean()  # sizes differ by 20 % within a size word
        for dim in (0, 1):
            ca = ((torch.arange(256) + 0.5) / 256 * wa.sum(1 - dim)).sum() / wa.sum()
            cb = ((torch.arange(512) + 0.5) / 512 * wb.sum(1 - dim)).sum() / wb.sum()
            assert abs(ca - cb) < 1 / 512  # half a pixel at 256; positions jitter by 0.03
        # the same colours: the background's at the corner, the object's own at its centre (a ring's is hollow)
        for img in (a, b):
            assert torch.allclose(img[:, 0, 0], _colour(s.background), atol=1e-6)
        for o in s.objects:
            want = _colour(o.colour if o.shape != "ring" else s.background)
            for img, n in ((a, 256), (b, 512)):
                assert torch.allclose(img[:, int(o.cy * n), int(o.cx * n)], want, atol=1e-6), (o, n)
    # the training stream's captions (and the scene behind each) are the same whatever the size rendered
    x_lo, cap_lo = train_teacher.render(202, 5, 6, 256, "cpu")
    x_hi, cap_hi = train_teacher.render(202, 5, 6, 512, "cpu")
    assert cap_lo == cap_hi == [s.caption for s in S.scenes(202, 6, start=5)]
    assert x_lo.shape[-1] == 256 and x_hi.shape[-1] == 512


@pytest.fixture
def unet_inputs(monkeypatch):
    """The latent side of every UNet forward during training (read at the UNet, not from the log)."""
    from diffusers import UNet2DConditionModel

    sides = []
    forward = UNet2DConditionModel.forward

    def spy(self, sample, *a, **k):
        if self.training:
            sides.append(sample.shape[-1])
        return forward(self, sample, *a, **k)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    return sides


def test_lower_resolution_then_the_full_one_resumes_and_exports_a_full_resolution_teacher(
        tmp_path, unet_inputs, monkeypatch):
    work = tmp_path / "w"
    common = ["--work", str(work), "--config", "tiny", "--device", "cpu", "--batch", "2", "--log-every", "1"]
    train_teacher.main(["vae", *common, "--steps", "1"])
    full = tiny_sd.CONFIGS["tiny"]["resolution"]
    low = full // 2
    unet_args = [*common, "--pool", "4", "--fresh", "2", "--ckpt-every", "1"]

    out = train_teacher.main(["unet", *unet_args, "--steps", "2", "--resolution", str(low)])
    assert out["step"] == 2 and out["res"] == low
    assert unet_inputs == [low // 8] * 2
    teacher = work / "teacher"
    _check_teacher_size(teacher, full, monkeypatch)  # a teacher exported after low-resolution steps only

    out = train_teacher.main(["unet", *unet_args, "--steps", "4"])  # same work folder, the config's resolution
    assert out["step"] == 4 and out["res"] == full and out["done"]
    assert unet_inputs == [low // 8] * 2 + [full // 8] * 2
    rows = [json.loads(ln) for ln in (work / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("stage") == "unet" and "loss" in r]
    assert [(r["step"], r["res"]) for r in steps] == [(1, low), (2, low), (3, full), (4, full)]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    # the optimizer carried on: Adam's own step count is the run's, not a fresh optimizer's 2
    opt = torch.load(work / "unet.pt", weights_only=True)["opt"]
    assert {float(s["step"]) for s in opt["state"].values()} == {4.0}
    _check_teacher_size(teacher, full, monkeypatch)

    # and back down again from the exported teacher on another machine (gpu_run.sh teacher-lowres)
    w2 = tmp_path / "w2"
    w2.mkdir()
    (w2 / "vae").symlink_to(work / "vae", target_is_directory=True)
    out = train_teacher.main(["unet", "--work", str(w2), "--config", "tiny", "--device", "cpu", "--batch", "2",
                              "--pool", "4", "--fresh", "2", "--steps", "5", "--resolution", str(low),
                              "--init-from", str(teacher)])
    assert out["step"] == 5 and out["res"] == low and unet_inputs[-1] == low // 8
    _check_teacher_size(w2 / "teacher", full, monkeypatch)


def _check_teacher_size(teacher, full, monkeypatch):
    """The default size of the exported folder, as diffusers' own pipeline and the engine read it."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None, requires_safety_checker=False)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == full
    img = pipe("a red circle on a white background", num_inference_steps=1, output_type="np").images
    assert img.shape == (1, full, full, 3)  # no width/height given: diffusers' default size
    # `bonsai distill` samples the teacher at its UNet's sample_size
    assert json.loads((teacher / "unet" / "config.json").read_text())["sample_size"] == full // 8

    from bonsai_core.engine import BonsaiImageEngine

    monkeypatch.delenv("BONSAI_WIDTH", raising=False)
    monkeypatch.delenv("BONSAI_HEIGHT", raising=False)
    req = BonsaiImageEngine.from_pretrained(teacher, device="cpu").check("a red circle").request
    # the engine's SD default is the family's 512 (it reads no training resolution), the shipped config's size
    assert (req.width, req.height) == (512, 512) == (FAMILY_DEFAULTS["sd_unet"].width, FAMILY_DEFAULTS["sd_unet"].height)
    assert tiny_sd.CONFIGS["shipped"]["resolution"] == 512


def test_a_resolution_the_vae_cannot_halve_to_latents_is_refused():
    with pytest.raises(SystemExit, match="--resolution 100: must be a positive multiple of 8"):
        train_teacher.training_resolution(100, tiny_sd.CONFIGS["shipped"])
    assert train_teacher.training_resolution(None, tiny_sd.CONFIGS["shipped"]) == 512
    assert train_teacher.training_resolution(256, tiny_sd.CONFIGS["shipped"]) == 256
