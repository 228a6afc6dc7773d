"""``bonsai batch``: one PNG per entry with its parameters, a manifest, resume without rewriting,
failed entries recorded while the rest go on, chained upscale and overlay, several processes under
``accelerate launch`` rendering each prompt once, and SIGKILLs at random moments."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from bonsai_core import cli
from bonsai_core.convert import convert_pipeline
from bonsai_core.engine import BonsaiImageEngine
from tests.kill_harness import batch_kill_campaign, batch_state
from tests.sd_fixtures import make_tiny_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ["--steps", "2", "--width", "64", "--height", "64", "--device", "cpu", "--dtype", "fp32", "--no-progress"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    return convert_pipeline(make_tiny_sd_pipeline(root / "fp"), root / "bonsai", log=lambda m: None).dst


def write(path: Path, lines) -> Path:
    path.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    return path


def batch(model, prompts, out, *extra) -> int:
    return cli.main(["batch", str(prompts), "--out", str(out), "--model", str(model), *SETTINGS, *extra])


def pixels(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.tensor(list(im.convert("RGB").getdata()), dtype=torch.float32)


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_one_png_per_entry_with_its_parameters_a_manifest_and_failed_entries_recorded(model, tmp_path, capsys):
    prompts = write(tmp_path / "p.jsonl", [{"prompt": "a red fox"}, {"prompt": "a blue bird", "seed": 42},
                                           {"prompt": "too small", "width": 4}, {"prompt": "a green tree"}])
    out = tmp_path / "out"
    assert batch(model, prompts, out) == 1  # one entry failed: exit 1, the others done
    err = capsys.readouterr().err
    assert "entry 2 ('too small') failed" in err and "3 of 4 images" in err
    lines = manifest(out)
    assert [(r["index"], r["status"]) for r in lines] == [(0, "ok"), (1, "ok"), (2, "failed"), (3, "ok")]
    assert "smaller than one 8-pixel tile" in lines[2]["error"]
    first = lines[0]
    assert first["seed"] == 0 and lines[1]["seed"] == 42 and lines[3]["seed"] == 3  # --seed (0) + index, or its own
    assert first["settings"]["steps"] == 2 and first["device"] == "cpu" and first["time_s"] > 0
    assert sorted(p.name for p in out.glob("*.png")) == [r["file"] for r in lines if r["status"] == "ok"]
    with Image.open(out / first["file"]) as im:
        assert "a red fox" in im.text["parameters"] and "Seed: 0" in im.text["parameters"]
        assert json.loads(im.text["bonsai"])["batch"]["fingerprint"] == first["fingerprint"]
    # the image is what `generate` makes for that prompt and seed
    eng = BonsaiImageEngine.from_pretrained(model, device="cpu", dtype="fp32")
    ref = eng.generate("a blue bird", steps=2, width=64, height=64, seed=42)
    assert torch.equal(pixels(out / lines[1]["file"]), pixels_of(ref.images[0]))


def pixels_of(image) -> torch.Tensor:
    return torch.tensor(list(image.convert("RGB").getdata()), dtype=torch.float32)


def test_a_second_run_skips_finished_images_without_touching_them_and_retries_failed_ones(model, tmp_path,
                                                                                          monkeypatch):
    prompts = write(tmp_path / "p.jsonl", [{"prompt": "a red fox"}, {"prompt": "bad", "width": 4}])
    out = tmp_path / "out"
    assert batch(model, prompts, out) == 1
    png = next(out.glob("00000-*.png"))
    before = png.stat()
    calls = []
    real = BonsaiImageEngine.generate
    monkeypatch.setattr(BonsaiImageEngine, "generate", lambda self, *a, **k: calls.append(a[0]) or real(self, *a, **k))
    assert batch(model, prompts, out) == 1
    assert calls == ["bad"]  # the finished one is not rendered again
    write(prompts, [{"prompt": "a red fox"}, {"prompt": "bad", "width": 64}])  # the user fixes the line
    assert batch(model, prompts, out) == 0
    assert calls == ["bad", "bad"]
    after = png.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # never rewritten
    assert [r["status"] for r in manifest(out)] == ["ok", "ok"]


def test_a_png_whose_record_was_lost_gets_it_back_from_its_own_text_without_rendering(model, tmp_path, monkeypatch):
    prompts = write(tmp_path / "p.txt", ["# a comment", "a red fox", "", "a blue bird"])
    out = tmp_path / "out"
    assert batch(model, prompts, out) == 0
    good = manifest(out)
    shutil.rmtree(out / ".bonsai-batch")
    (out / "manifest.jsonl").unlink()
    monkeypatch.setattr(BonsaiImageEngine, "from_pretrained", lambda *a, **k: pytest.fail("rendered again"))
    assert batch(model, prompts, out) == 0
    assert manifest(out) == good


def test_a_folder_holding_another_batchs_image_under_an_entry_name_is_refused(model, tmp_path, capsys):
    out = tmp_path / "out"
    assert batch(model, write(tmp_path / "a.txt", ["a red fox"]), out) == 0
    png = next(out.glob("*.png"))
    shutil.rmtree(out / ".bonsai-batch")
    before = png.read_bytes()
    assert batch(model, write(tmp_path / "b.txt", ["a red fox"]), out, "--seed", "7") == 2
    assert "already exists and was not made by this batch entry" in capsys.readouterr().err
    assert png.read_bytes() == before


def test_upscale_and_overlay_are_chained_after_the_render(model, tmp_path):
    prompts = write(tmp_path / "p.jsonl", [{"prompt": "a red fox"}, {"prompt": "a blue bird", "overlay": "HELLO"}])
    plain, chained = tmp_path / "plain", tmp_path / "chained"
    assert batch(model, prompts, plain) == 0
    assert batch(model, prompts, chained, "--upscale", "2", "--overlay-position", "center") == 0
    a, b = sorted(plain.glob("*.png")), sorted(chained.glob("*.png"))
    with Image.open(a[0]) as im:
        expected = im.convert("RGB").resize((128, 128), Image.LANCZOS)
    with Image.open(b[0]) as im:
        assert im.size == (128, 128) and torch.equal(pixels_of(im), pixels_of(expected))
    with Image.open(b[1]) as im, Image.open(a[1]) as base:
        assert im.size == (128, 128)
        diff = (pixels_of(im) - pixels_of(base.convert("RGB").resize((128, 128), Image.LANCZOS))).abs()
        assert diff.max() > 100  # the text is drawn
    assert manifest(chained)[1]["settings"]["overlay"] == "HELLO"


def _launch(model, prompts, out, *launch_args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "bonsai_core", "batch", str(prompts),
           "--out", str(out), "--model", str(model), *SETTINGS[:-5], "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def _rendered_counts(stderr: str) -> dict[int, int]:
    import re

    return {int(m[0]): int(m[1]) for m in re.findall(r"process (\d+)/\d+ rendered (\d+) image", stderr)}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU launch")
def test_two_processes_under_accelerate_render_each_prompt_once_with_one_merged_manifest(model, tmp_path):
    names = ["a red fox", "a blue bird", "a green tree", "the sea", "snow on a roof"]
    prompts = write(tmp_path / "p.txt", names)
    out = tmp_path / "out"
    # no GPU: accelerate's multi-process launcher (torchrun) starts two CPU processes joined with gloo
    run = _launch(model, prompts, out, "--multi_gpu", "--num_processes", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    counts = _rendered_counts(run.stderr)
    assert set(counts) == {0, 1} and sum(counts.values()) == len(names) and min(counts.values()) >= 2
    lines = manifest(out)
    assert [r["index"] for r in lines] == list(range(5)) and [r["prompt"] for r in lines] == names
    assert {r["process"] for r in lines} == {0, 1} and all(r["status"] == "ok" for r in lines)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["file"] for r in lines)
    # the same images as one process makes
    single = tmp_path / "single"
    assert batch(model, prompts, single) == 0
    for r in lines:
        assert torch.equal(pixels(out / r["file"]), pixels(single / r["file"]))
    # --cpu: accelerate starts several CPU processes only through mpirun; without it one process does
    # the whole batch (each prompt still exactly once) and says so
    again = _launch(model, prompts, tmp_path / "cpu", "--cpu", "--num_processes", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _rendered_counts(again.stderr) == {0: len(names)} and "accelerate started one process" in again.stderr
    assert [r["index"] for r in manifest(tmp_path / "cpu")] == list(range(5))


def test_killed_at_random_moments_and_restarted_every_image_is_there_once_and_the_manifest_is_valid(model, tmp_path):
    names = [f"prompt number {i}" for i in range(6)]
    prompts = write(tmp_path / "p.txt", names)
    out = tmp_path / "out"

    def run():
        code = batch(model, prompts, out)
        os._exit(code)

    BonsaiImageEngine.from_pretrained(model, device="cpu", dtype="fp32").generate("warm", steps=1, width=64, height=64)
    killed, problems = batch_kill_campaign(run, out, kills=10, seed=5)
    assert not problems, problems
    assert len(killed) == 10 and any(done > 0 for _t, done in killed)  # some kills landed mid-batch
    assert batch(model, prompts, out) == 0
    state = batch_state(out)
    lines = state["manifest"]
    assert not state["broken"] and not state["temps"]
    assert [r["index"] for r in lines] == list(range(6)) and all(r["status"] == "ok" for r in lines)
    assert state["pngs"] == sorted(r["file"] for r in lines)  # every image exactly once
    reference = tmp_path / "reference"
    assert batch(model, prompts, reference) == 0
    for r in lines:  # and each is the image an uninterrupted run makes
        assert torch.equal(pixels(out / r["file"]), pixels(reference / r["file"]))


def test_a_batch_with_a_lora_records_it_and_a_rerun_with_another_strength_is_refused(model, tmp_path, capsys):
    from tests import lora_fixtures as lf

    fam = BonsaiImageEngine.from_pretrained(model, device="cpu", dtype="fp32").family
    mods = {m: fam.unet.get_submodule(m) for m in lf.UNET_TARGETS[:3]}
    pairs = {("unet", k): v for k, v in lf.random_pairs(mods, rank=4, seed=3, scale=0.3).items()}
    lora = lf.write_kohya(tmp_path / "style.safetensors", pairs, {k: 4.0 for k in pairs})
    prompts = write(tmp_path / "p.txt", ["a red fox"])
    assert batch(model, prompts, tmp_path / "plain") == 0
    assert batch(model, prompts, tmp_path / "styled", "--lora", f"{lora}:0.9") == 0
    (line,) = manifest(tmp_path / "styled")
    assert line["loras"] == [{"name": "style.safetensors", "strength": 0.9}]
    file = line["file"]
    assert not torch.equal(pixels(tmp_path / "styled" / file), pixels(tmp_path / "plain" / file))
    shutil.rmtree(tmp_path / "styled" / ".bonsai-batch")  # only the PNG's own record is left
    assert batch(model, prompts, tmp_path / "styled", "--lora", f"{lora}:0.5") == 2
    assert "was not made by this batch entry" in capsys.readouterr().err


def test_bad_prompt_files_and_outputs_are_refused_before_any_work(model, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert batch(model, write(tmp_path / "p.txt", ["a fox"]), tmp_path / "file") == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    assert batch(model, write(tmp_path / "p.jsonl", ['{"prompt": "a", "colour": 1}']), tmp_path / "o") == 2
    assert "p.jsonl:1: unknown key(s) ['colour']" in capsys.readouterr().err
    assert batch(model, write(tmp_path / "e.txt", ["# only a comment"]), tmp_path / "o") == 2
    assert "no prompts in the file" in capsys.readouterr().err
    assert batch(model, write(tmp_path / "p.csv", ["a"]), tmp_path / "o") == 2
    assert not (tmp_path / "o").exists()
