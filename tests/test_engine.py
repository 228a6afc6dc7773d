"""BonsaiImageEngine on a tiny SD-shaped model: reproducible images, metadata, progress, cancel,
guardrails, memory errors, the CLI, and Hub loading in offline mode."""

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
from bonsai_core.engine import BonsaiImageEngine, load_engine, unload_current
from bonsai_core.errors import BonsaiCancelledError, BonsaiCheckpointError, BonsaiMemoryError, BonsaiRequestError
from bonsai_core.quant.layers import BonsaiLinear
from tests.sd_fixtures import make_tiny_sd_pipeline

SMALL = dict(width=64, height=64, steps=3)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    src = make_tiny_sd_pipeline(root / "tiny-sd-fp32")
    convert_pipeline(src, root / "tiny-sd-bonsai", log=lambda m: None)
    return {"fp": src, "bonsai": root / "tiny-sd-bonsai"}


@pytest.fixture(scope="module")
def eng(models):
    return BonsaiImageEngine.from_pretrained(models["bonsai"], device="cpu")


def test_bonsai_model_loads_with_quantized_unet(eng):
    assert eng.family.name == "sd_unet" and eng.device.type == "cpu" and eng.dtype == torch.float32
    assert any(isinstance(m, BonsaiLinear) for m in eng.family.unet.modules())


def test_same_seed_gives_identical_pixels_and_other_seeds_differ(eng):
    a = eng.generate("a red bonsai tree", seed=7, **SMALL)
    b = eng.generate("a red bonsai tree", seed=7, **SMALL)
    c = eng.generate("a red bonsai tree", seed=8, **SMALL)
    assert a.tensor.shape == (1, 64, 64, 3)
    assert torch.equal(a.tensor, b.tensor)
    assert not torch.equal(a.tensor, c.tensor)
    assert a.images[0].size == (64, 64)


def test_batch_image_i_is_the_single_image_of_seed_plus_i(eng):
    batch = eng.generate("a lantern", seed=100, batch=2, **SMALL)
    second = eng.generate("a lantern", seed=101, **SMALL)
    assert batch.metadata["seeds"] == [100, 101]
    torch.testing.assert_close(batch.tensor[1], second.tensor[0], atol=2e-5, rtol=0)


@pytest.mark.parametrize("sampler,karras", [("euler", False), ("dpmpp_2m", True)])
def test_metadata_records_the_whole_request(eng, sampler, karras):
    r = eng.generate("a cat", "a dog", seed=1, sampler=sampler, karras=karras, guidance=5.0, **SMALL)
    m = r.metadata
    for key, value in dict(device="cpu", dtype="float32", sampler=sampler, karras=karras, steps=3, guidance=5.0,
                           seed=1, width=64, height=64, prompt="a cat", negative_prompt="a dog",
                           family="sd_unet", model="tiny-sd-bonsai").items():
        assert m[key] == value, key
    assert m["prompt_tokens"] == len(eng.family.tokenizer()("a cat").input_ids)
    assert set(m["timings"]) >= {"load_s", "encode_s", "denoise_s", "decode_s", "total_s"}
    assert m["peak_bytes"] is None or m["peak_bytes"] > 0


def test_empty_negative_gets_the_default_negative(eng):
    r = eng.generate("a cat", seed=1, **SMALL)
    assert r.metadata["negative_prompt"] == eng.config.negative_default


def test_progress_callback_every_step_and_cancel_stops_the_loop(eng):
    seen = []
    eng.generate("a cat", seed=1, callback=lambda i, n, x0: seen.append((i, n, tuple(x0.shape))), **SMALL)
    assert seen == [(1, 3, (1, 4, 8, 8)), (2, 3, (1, 4, 8, 8)), (3, 3, (1, 4, 8, 8))]
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2
    with pytest.raises(BonsaiCancelledError, match="step 2/3"):
        eng.generate("a cat", seed=1, cancel=cancel, **SMALL)


def test_guardrails_refuse_bad_requests_with_the_value(eng):
    with pytest.raises(BonsaiRequestError, match="1000"):
        eng.generate("a cat", width=1000, height=512, steps=2, guardrail="refuse")
    with pytest.raises(BonsaiRequestError, match=r"steps 0 is not a whole number in 1-150"):
        eng.generate("a cat", width=64, height=64, steps=0)
    with pytest.raises(BonsaiRequestError, match="sampler 'heun'"):
        eng.generate("a cat", sampler="heun", **SMALL)


def test_guardrail_clamp_fixes_the_size(eng):
    r = eng.generate("a cat", width=70, height=60, steps=2, seed=0, guardrail="clamp")
    assert (r.metadata["width"], r.metadata["height"]) == (72, 64)
    assert r.tensor.shape == (1, 64, 72, 3)


def test_out_of_memory_becomes_bonsai_memory_error_with_advice(eng, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
    monkeypatch.setattr(eng.family, "denoiser", oom)
    with pytest.raises(BonsaiMemoryError, match="smaller size.*fewer images.*close other programs"):  # on the cpu already
        eng.generate("a cat", **SMALL)


def test_full_precision_folder_loads_unquantized_for_comparison(models):
    fp = BonsaiImageEngine.from_pretrained(models["fp"], device="cpu")
    assert not any(isinstance(m, BonsaiLinear) for m in fp.family.unet.modules())
    r = fp.generate("a cat", seed=3, **SMALL)
    assert torch.isfinite(r.tensor).all()
    fp.unload()
    with pytest.raises(BonsaiRequestError, match="unloaded"):
        fp.generate("a cat", **SMALL)


def test_load_engine_reuses_and_switching_unloads_the_previous(models):
    a = load_engine(models["bonsai"], device="cpu")
    assert load_engine(models["bonsai"], device="cpu") is a
    b = load_engine(models["fp"], device="cpu")
    assert b is not a and a.family is None
    unload_current()
    assert b.family is None


def test_png_carries_parameters_and_is_written_atomically(eng, tmp_path, monkeypatch):
    r = eng.generate("a cat", seed=5, **SMALL)
    path = r.save(tmp_path / "out.png")
    img = Image.open(path)
    assert "Seed: 5" in img.text["parameters"] and "Steps: 3" in img.text["parameters"]
    assert json.loads(img.text["bonsai"])["seed"] == 5

    def broken_save(self, fp, *a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError):
        r.save(tmp_path / "never.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_cli_generate_writes_a_png(models, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code = cli.main(["generate", "a cat", "--model", str(models["bonsai"]), "--device", "cpu", "--steps", "2",
                     "--width", "64", "--height", "64", "--seed", "4", "--sampler", "euler", "--out", str(out)])
    assert code == 0
    assert Image.open(out).text["parameters"].startswith("a cat")
    assert str(out) in capsys.readouterr().out


def test_cli_generate_without_model_uses_the_shipped_model(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("BONSAI_MODEL", raising=False)
    out = tmp_path / "circle.png"
    assert cli.main(["generate", "a red circle on a white background", "--steps", "2", "--width", "64",
                     "--height", "64", "--out", str(out)]) == 0
    assert "bonsai-shapes" in capsys.readouterr().err
    from PIL import Image

    assert Image.open(out).size == (64, 64)


def test_hub_repo_id_loads_from_the_cache_in_offline_mode(models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"
    with pytest.raises(BonsaiCheckpointError, match="not in the cache.*offline"):
        BonsaiImageEngine.from_pretrained("someone/tiny-bonsai", device="cpu", cache_dir=str(cache))
    # lay the snapshot out the way huggingface_hub's cache does, then load it by repo id, offline
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-bonsai"
    shutil.copytree(models["bonsai"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    e = BonsaiImageEngine.from_pretrained("someone/tiny-bonsai", device="cpu", cache_dir=str(cache))
    assert e.family.name == "sd_unet" and e.source == "someone/tiny-bonsai"


def test_not_a_path_nor_a_repo_id_is_refused(tmp_path):
    with pytest.raises(BonsaiCheckpointError, match="neither an existing file or folder nor a Hub repo id"):
        BonsaiImageEngine.from_pretrained(str(tmp_path / "missing" / "deep" / "x"), device="cpu")


def test_cli_info_config_shows_each_setting_and_its_source(monkeypatch, capsys):
    monkeypatch.setenv("BONSAI_MAX_VRAM_GB", "4")
    assert cli.main(["info", "--config"]) == 0
    out = capsys.readouterr().out
    assert "max_vram_gb" in out and "BONSAI_MAX_VRAM_GB" in out and "negative_default" in out


def test_warn_mode_makes_the_image_at_the_size_it_reports(eng):
    r = eng.generate("a cat", width=68, height=64, steps=2, seed=0, guardrail="warn")
    assert (r.metadata["width"], r.metadata["height"]) == (64, 64) and r.tensor.shape == (1, 64, 64, 3)
    assert any("made at 64x64" in w for w in r.warnings)


def test_cli_out_gets_a_png_suffix_and_a_folder_is_refused_before_loading(models, tmp_path, capsys):
    args = ["generate", "a cat", "--model", str(models["bonsai"]), "--device", "cpu", "--steps", "1",
            "--width", "64", "--height", "64", "--seed", "1"]
    assert cli.main(args + ["--out", str(tmp_path / "single")]) == 0
    assert (tmp_path / "single.png").is_file()
    assert cli.main(args + ["--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


SETTINGS_ENV = {"BONSAI_STEPS": "2", "BONSAI_WIDTH": "72", "BONSAI_HEIGHT": "56", "BONSAI_GUIDANCE": "3.5",
                "BONSAI_SAMPLER": "euler", "BONSAI_KARRAS": "1", "BONSAI_SCHEDULE": "dpm"}


def test_generation_settings_from_the_environment_reach_generate(models, monkeypatch):
    for var, value in SETTINGS_ENV.items():
        monkeypatch.setenv(var, value)
    monkeypatch.setenv("BONSAI_MAX_SIDE", "64")
    e = BonsaiImageEngine.from_pretrained(models["bonsai"], device="cpu")
    r = e.generate("a cat", "a dog", seed=1)
    m = r.metadata
    assert (m["steps"], m["width"], m["height"], m["guidance"]) == (2, 72, 56, 3.5)
    assert (m["sampler"], m["karras"], m["schedule"]) == ("euler", True, "dpm")
    assert any("largest side 64" in w for w in r.warnings)  # BONSAI_MAX_SIDE reached the guardrail
    # the schedule really is DPM-Solver's Karras sigmas: the same image as asking for them outright
    monkeypatch.delenv("BONSAI_SCHEDULE")
    monkeypatch.delenv("BONSAI_KARRAS")
    plain = BonsaiImageEngine.from_pretrained(models["bonsai"], device="cpu")
    same = plain.generate("a cat", "a dog", seed=1, schedule="dpm", karras=True)
    assert torch.equal(same.tensor, r.tensor)
    assert not torch.equal(plain.generate("a cat", "a dog", seed=1).tensor, r.tensor)
    # an argument beats the environment
    assert e.generate("a cat", seed=1, steps=3, width=64).metadata["steps"] == 3


def test_cli_generate_takes_settings_from_the_environment_and_flags_beat_them(models, tmp_path, monkeypatch):
    for var, value in SETTINGS_ENV.items():
        monkeypatch.setenv(var, value)
    out = tmp_path / "env.png"
    assert cli.main(["generate", "a cat", "--model", str(models["bonsai"]), "--device", "cpu", "--seed", "4",
                     "--out", str(out)]) == 0
    params = Image.open(out).text["parameters"]
    assert "Steps: 2, Sampler: euler Karras, CFG scale: 3.5" in params and "Size: 72x56" in params
    assert cli.main(["generate", "a cat", "--model", str(models["bonsai"]), "--device", "cpu", "--seed", "4",
                     "--steps", "1", "--sampler", "dpmpp_2m", "--out", str(out)]) == 0
    assert "Steps: 1, Sampler: dpmpp_2m" in Image.open(out).text["parameters"]


def test_cli_info_config_for_a_model_shows_its_family_values(models, monkeypatch, capsys):
    monkeypatch.delenv("BONSAI_STEPS", raising=False)
    assert cli.main(["info", str(models["bonsai"]), "--config"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "24" in lines["steps"] and lines["steps"].endswith("sd_unet family default")
    assert "'dpmpp_2m'" in lines["sampler"] and "euler" not in lines["sampler"]


MEASURE_PEAK = """
import json, sys
from bonsai_core.engine import BonsaiImageEngine
e = BonsaiImageEngine.from_pretrained(sys.argv[1], device="cpu")
e.generate("warm up", steps=1, width=64, height=64, seed=0)
r = e.generate("a cat", "a dog", steps=2, width=384, height=320, seed=0, max_side=512)
print(json.dumps(dict(added=r.metadata["peak_added_bytes"], estimate=r.metadata["estimate_bytes"],
                      resident=e.family.memory_model(cfg=True).resident_bytes)))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resident-peak counters")
def test_memory_estimate_holds_against_the_measured_peak_of_a_tiny_generation(models):
    from bonsai_core.guardrails import ALLOCATOR_SLACK

    # A fixed mmap threshold makes every large block its own mapping, given back when freed, so the
    # process's resident high-water mark is what was alive at the peak (not what malloc kept).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", MEASURE_PEAK, str(models["bonsai"])], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    m = json.loads(done.stdout.strip().splitlines()[-1])
    estimated = m["estimate"] / ALLOCATOR_SLACK - m["resident"]  # the weights were resident before
    assert 0.75 <= estimated / m["added"] <= 1.25, m


def test_the_cpu_estimate_counts_the_dense_cache_for_every_kernel_choice_but_the_reference(eng, monkeypatch):
    """On a CPU, a CUDA kernel named in BONSAI_KERNEL leaves its inputs to the auto choice (the
    cpu-cache kernel, which keeps dense weights): the memory estimate counts that cache as for auto;
    only the reference keeps none."""
    from bonsai_core.quant import kernels

    fam = eng.family

    def unpacked(choice):
        monkeypatch.setenv(kernels.ENV, choice)
        kernels.reload()
        try:
            return fam.unpacked_bytes()
        finally:
            monkeypatch.delenv(kernels.ENV)
            kernels.reload()

    auto = unpacked("auto")
    assert unpacked("triton") == unpacked("mma") == auto > unpacked("reference")


@pytest.mark.parametrize("phases", [True, False])
def test_each_phase_has_its_own_cuda_peak_and_the_whole_peak_is_the_largest(eng, monkeypatch, phases):
    """Asked to (``measure_phases``), the engine resets the CUDA allocator's peak as each phase begins:
    a fake allocator (1000 bytes held throughout; the encode, a step and the decode each hold a known
    amount for a moment) gives each phase's hand-counted peak, and the whole image's is the largest of
    them. Not asked (the default), it resets once, at the start, so a meter read around ``generate``
    still sees the whole run's peak."""
    import bonsai_core.engine as engine_mod

    mem = {"now": 1000, "max": 1000}

    def hold(n):
        mem["now"] += n
        mem["max"] = max(mem["max"], mem["now"])
        mem["now"] -= n

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: mem.update(max=mem["now"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: mem["max"])
    real_peak = engine_mod._PeakMemory
    monkeypatch.setattr(engine_mod, "_PeakMemory", lambda device, phases: real_peak(torch.device("cuda"), phases))
    fam = eng.family
    encode, denoiser, decode = fam.encode, fam.denoiser, fam.decode

    def denoiser_holding(*a, **k):
        step = denoiser(*a, **k)
        return lambda x, i: (hold(300), step(x, i))[1]

    monkeypatch.setattr(fam, "encode", lambda prompts: (hold(100), encode(prompts))[1])
    monkeypatch.setattr(fam, "denoiser", denoiser_holding)
    monkeypatch.setattr(fam, "decode", lambda *a: (hold(50), decode(*a))[1])
    monkeypatch.setattr(eng, "measure_phases", phases)
    m = eng.generate("a phase of its own", seed=3, **SMALL).metadata
    if phases:
        assert m["phase_peak_bytes"] == {"encode": 1100, "denoise": 1300, "decode": 1050}
    else:
        assert m["phase_peak_bytes"] == {"encode": None, "denoise": None, "decode": None}
        assert mem["max"] == 1300  # what an outer meter reads after the run
    assert (m["peak_bytes"], m["peak_kind"]) == (1300, "cuda allocator")


def test_phase_peaks_are_none_off_cuda(eng):
    m = eng.generate("a cpu run", seed=3, **SMALL).metadata
    assert m["phase_peak_bytes"] == {"encode": None, "denoise": None, "decode": None}
