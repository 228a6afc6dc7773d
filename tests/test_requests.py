"""Bad requests end in BonsaiErrors before any work: seeds, prompts, host memory, --out, device names."""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bonsai_core import cli
from bonsai_core.convert import convert_pipeline
from bonsai_core.engine import BonsaiImageEngine, check_seed
from bonsai_core.errors import BonsaiDeviceError, BonsaiMemoryError, BonsaiRequestError
from tests.sd_fixtures import make_tiny_sd_pipeline

SMALL = dict(width=64, height=64, steps=2)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("req")
    convert_pipeline(make_tiny_sd_pipeline(root / "fp"), root / "bonsai", log=lambda m: None)
    return root / "bonsai"


@pytest.fixture(scope="module")
def eng(model):
    return BonsaiImageEngine.from_pretrained(model, device="cpu")


@pytest.mark.parametrize("seed", [5.0, 5.7, "5", True, math.nan, -1, 2**64, [5]])
def test_a_seed_that_is_not_a_whole_number_in_range_is_refused_not_truncated(seed):
    with pytest.raises(BonsaiRequestError, match="seed"):
        check_seed(seed)


def test_whole_number_seeds_of_any_integer_type_are_taken():
    assert check_seed(np.int64(7)) == 7 and check_seed(2**64 - 1) == 2**64 - 1 and check_seed(None) is None


def test_generate_refuses_a_float_seed_before_encoding(eng):
    with pytest.raises(BonsaiRequestError, match=r"seed 5\.5 \(float\) is not a whole number"):
        eng.generate("a cat", seed=5.5, **SMALL)


@pytest.mark.parametrize("prompt, pattern", [(b"a cat", "is a bytes"), (42, "is a int"),
                                              ("a \udcff cat", r"holds '\\udcff' at character 2")])
def test_a_prompt_must_be_text(eng, prompt, pattern):
    with pytest.raises(BonsaiRequestError, match=pattern):
        eng.generate(prompt, seed=1, **SMALL)
    with pytest.raises(BonsaiRequestError, match=pattern.replace("prompt", "negative prompt")
                       if False else pattern):
        eng.check("a cat", prompt)


def test_undecodable_command_line_bytes_are_refused_with_a_message(model, capsys):
    prompt = os.fsdecode(b"a caf\xe9 cat")  # Latin-1 bytes: what a non-UTF-8 shell passes
    code = cli.main(["generate", prompt, "--model", str(model), "--device", "cpu", "--steps", "2",
                     "--width", "64", "--height", "64", "--out", "/tmp/never-written.png"])
    assert code != 0 and "not text" in capsys.readouterr().err
    assert not os.path.exists("/tmp/never-written.png")


def test_host_memory_that_would_run_out_is_refused_in_every_mode(eng, monkeypatch):
    import bonsai_core.engine as engine_mod

    monkeypatch.setattr(engine_mod, "_available_memory", lambda device: 1)  # nothing free
    for mode in ("warn", "clamp", "refuse"):
        with pytest.raises(BonsaiMemoryError, match="needs about"):
            eng.check("a cat", batch=8, mode=mode, **SMALL)


def test_an_allocation_failure_while_generating_becomes_a_memory_error(eng, monkeypatch):
    def no_memory(*a, **k):
        raise MemoryError

    monkeypatch.setattr(eng.family, "decode", no_memory)
    with pytest.raises(BonsaiMemoryError, match="ran out of memory generating 1 image"):
        eng.generate("a cat", seed=1, **SMALL)


def test_out_is_checked_before_any_work(model, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out, pattern in ((blocker / "img.png", "is a file, not a folder"), (tmp_path / "img.gif", "is none of those")):
        code = cli.main(["generate", "a cat", "--model", str(tmp_path / "no-such-model"), "--out", str(out)])
        err = capsys.readouterr().err
        assert code != 0 and pattern in err and "no-such-model" not in err  # refused before loading


def test_out_unwritable_folder_is_refused(model, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # tests run as root, who may write anywhere
    code = cli.main(["generate", "a cat", "--model", str(model), "--out", str(tmp_path / "x.png")])
    assert code != 0 and "permission denied" in capsys.readouterr().err


@pytest.mark.parametrize("suffix, magic", [(".jpg", b"\xff\xd8\xff"), (".webp", b"RIFF"), (".png", b"\x89PNG")])
def test_the_image_is_written_in_the_format_its_extension_names(model, tmp_path, suffix, magic):
    out = tmp_path / f"img{suffix}"
    assert cli.main(["generate", "a cat", "--model", str(model), "--device", "cpu", "--steps", "2",
                     "--width", "64", "--height", "64", "--seed", "3", "--out", str(out)]) == 0
    assert out.read_bytes()[:len(magic)] == magic
    with Image.open(out) as im:
        text = im.text.get("parameters") if suffix == ".png" else im.getexif().get(0x9286)
    assert "Seed: 3" in text


def test_a_device_from_the_environment_is_reported_as_such(model, monkeypatch):
    monkeypatch.setenv("BONSAI_DEVICE", "gpu")
    from bonsai_core.config import BonsaiConfig

    with pytest.raises(BonsaiDeviceError, match=r"unknown device 'gpu' \(env BONSAI_DEVICE\)"):
        BonsaiImageEngine.from_pretrained(model, config=BonsaiConfig.from_env())


def test_image_i_of_a_batch_starts_from_the_noise_of_seed_plus_i_alone(eng):
    """What README promises of batches: the same starting noise, and pixels within one level."""
    batch = eng.generate("a cat", seed=5, batch=2, **SMALL)
    alone = eng.generate("a cat", seed=6, **SMALL)
    diff = (np.asarray(batch.images[1], dtype=int) - np.asarray(alone.images[0], dtype=int))
    assert np.abs(diff).max() <= 1
    assert batch.metadata["seeds"] == [5, 6]
