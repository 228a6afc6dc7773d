"""BonsaiConfig: defaults, then BONSAI_* variables, then flags; and where each value came from."""

import dataclasses

import pytest

from bonsai_core.config import FAMILY_DEFAULTS, GIB, SHIPPED_MODEL, BonsaiConfig
from bonsai_core.errors import BonsaiRequestError


def test_defaults_are_the_design_table():
    c = BonsaiConfig()
    assert (c.cache_dir, c.device) == ("./models/bonsai_cache", "auto")
    # generation settings default to the model family's (the checkpoint decides the family)
    assert (c.steps, c.width, c.height, c.guidance, c.sampler, c.karras, c.max_side) == (None,) * 7
    assert c.schedule == "auto"
    assert c.max_vram_gb == 6.0 and c.free_cache_on_switch is True
    assert c.style_prefix == "digital painting, concept art, cinematic lighting"
    assert c.use_style_prefix is False
    assert c.negative_default == "blurry, low quality, artifacts, watermark, deformed"


def test_the_shipped_model_is_the_default_and_its_name_finds_the_packaged_folder():
    from bonsai_core.hub import resolve_model
    from bonsai_core.shipped import SHIPPED_DIR

    assert SHIPPED_MODEL == "bonsai-shapes"
    assert BonsaiConfig.from_env({}).model == "bonsai-shapes"
    assert resolve_model("bonsai-shapes", cache_dir="/nonexistent") == SHIPPED_DIR
    assert (SHIPPED_DIR / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_the_shipped_name_in_an_install_without_the_model_says_so(monkeypatch, tmp_path):
    from bonsai_core import hub
    from bonsai_core.errors import BonsaiCheckpointError

    monkeypatch.setattr(hub, "shipped_model", lambda: None)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BonsaiCheckpointError, match="shipped model.*carries none"):
        hub.resolve_model("bonsai-shapes")


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        BonsaiConfig().steps = 30


def test_env_variables_override_defaults():
    env = {
        "BONSAI_MODEL": "org/bonsai-sd",
        "BONSAI_CACHE": "/tmp/cache",
        "BONSAI_DEVICE": "cpu",
        "BONSAI_MAX_VRAM_GB": "4.5",
    }
    c = BonsaiConfig.from_env(env)
    assert (c.model, c.cache_dir, c.device, c.max_vram_gb) == ("org/bonsai-sd", "/tmp/cache", "cpu", 4.5)
    assert c.source("device") == "env BONSAI_DEVICE"
    assert c.source("steps") == "default"


def test_flag_beats_env_and_none_means_not_given():
    env = {"BONSAI_DEVICE": "cpu", "BONSAI_MODEL": "env/model"}
    c = BonsaiConfig.from_env(env, device="cuda", model=None, steps=30)
    assert c.device == "cuda" and c.source("device") == "flag"
    assert c.model == "env/model" and c.source("model") == "env BONSAI_MODEL"
    assert c.steps == 30 and c.source("steps") == "flag"


def test_empty_env_variable_counts_as_unset():
    c = BonsaiConfig.from_env({"BONSAI_DEVICE": "  ", "BONSAI_MAX_VRAM_GB": ""})
    assert c.device == "auto" and c.max_vram_gb == 6.0
    assert c.source("device") == "default"


def test_from_env_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("BONSAI_CACHE", "/data/bonsai")
    assert BonsaiConfig.from_env().cache_dir == "/data/bonsai"


def test_bad_vram_env_value_names_the_variable_and_the_value():
    with pytest.raises(BonsaiRequestError, match=r"BONSAI_MAX_VRAM_GB='abc'.*positive number"):
        BonsaiConfig.from_env({"BONSAI_MAX_VRAM_GB": "abc"})


@pytest.mark.parametrize("bad", ["0", "-2", "nan", "inf"])
def test_vram_budget_must_be_positive_and_finite(bad):
    with pytest.raises(BonsaiRequestError, match="BONSAI_MAX_VRAM_GB"):
        BonsaiConfig.from_env({"BONSAI_MAX_VRAM_GB": bad})


def test_bad_vram_flag_is_refused_too():
    with pytest.raises(BonsaiRequestError, match=r"max_vram_gb=-1"):
        BonsaiConfig.from_env({}, max_vram_gb=-1)


def test_unknown_override_is_a_programming_error():
    with pytest.raises(TypeError, match="stpes"):
        BonsaiConfig.from_env({}, stpes=20)


def test_max_vram_bytes_counts_gib():
    assert BonsaiConfig(max_vram_gb=1.5).max_vram_bytes == int(1.5 * GIB)


def test_describe_lists_every_setting_value_and_source():
    text = BonsaiConfig.from_env({"BONSAI_CACHE": "/c"}, steps=30).describe()
    lines = {line.split()[0]: line for line in text.splitlines()}
    assert "'/c'" in lines["cache_dir"] and lines["cache_dir"].endswith("env BONSAI_CACHE")
    assert "30" in lines["steps"] and lines["steps"].endswith("flag")
    assert lines["sampler"].endswith("family default") and "'dpmpp_2m'" in lines["sampler"]
    assert "'euler'" in lines["sampler"]  # no model named: each family's value is shown
    assert "'bonsai-shapes'" in lines["model"] and lines["model"].endswith("default")  # the shipped model
    assert "sources" not in lines


def test_family_defaults_sd_unet_and_klein():
    sd, klein = FAMILY_DEFAULTS["sd_unet"], FAMILY_DEFAULTS["flux2_klein"]
    assert (sd.steps, sd.guidance, sd.max_tokens, sd.multiple_of, sd.use_cfg) == (24, 7.5, 77, 8, True)
    assert sd.steps_advice == (20, 28) and sd.max_side == 768
    xl = FAMILY_DEFAULTS["sdxl"]
    assert (xl.width, xl.height, xl.max_side, xl.max_tokens, xl.use_cfg) == (1024, 1024, 1536, 77, True)
    assert (klein.steps, klein.guidance, klein.sampler, klein.use_cfg) == (4, 1.0, "euler", False)
    assert (klein.width, klein.height, klein.max_side, klein.max_tokens) == (1024, 1024, 2048, 512)
    assert klein.multiple_of == 32 and klein.steps_advice == (4, 8)


def test_describe_for_a_family_shows_only_what_is_in_force():
    text = BonsaiConfig.from_env({"BONSAI_GUIDANCE": "2.5"}).describe("flux2_klein")
    lines = {line.split()[0]: line for line in text.splitlines()}
    assert "4" in lines["steps"] and lines["steps"].endswith("flux2_klein family default")
    assert "'euler'" in lines["sampler"] and "dpmpp_2m" not in lines["sampler"]
    assert "1024" in lines["width"] and "512" not in lines["width"]
    assert "2.5" in lines["guidance"] and lines["guidance"].endswith("env BONSAI_GUIDANCE")


@pytest.mark.parametrize("var,value,name,want", [
    ("BONSAI_STEPS", "30", "steps", 30), ("BONSAI_WIDTH", "640", "width", 640), ("BONSAI_HEIGHT", "384", "height", 384),
    ("BONSAI_GUIDANCE", "4.5", "guidance", 4.5), ("BONSAI_SAMPLER", "Euler", "sampler", "euler"),
    ("BONSAI_KARRAS", "yes", "karras", True), ("BONSAI_KARRAS", "0", "karras", False),
    ("BONSAI_SCHEDULE", "dpm", "schedule", "dpm"), ("BONSAI_MAX_SIDE", "1024", "max_side", 1024),
])
def test_generation_settings_come_from_the_environment(var, value, name, want):
    c = BonsaiConfig.from_env({var: value})
    assert getattr(c, name) == want and c.source(name) == f"env {var}"


@pytest.mark.parametrize("var,value,says", [
    ("BONSAI_STEPS", "many", "whole number"), ("BONSAI_STEPS", "0", "whole number"),
    ("BONSAI_WIDTH", "51.5", "whole number"), ("BONSAI_GUIDANCE", "high", "a number"),
    ("BONSAI_SAMPLER", "heun", "euler, dpmpp_2m"), ("BONSAI_KARRAS", "maybe", "on or off"),
    ("BONSAI_SCHEDULE", "karras", "auto, euler, dpm"),
])
def test_a_bad_generation_setting_names_the_variable_the_value_and_the_choices(var, value, says):
    with pytest.raises(BonsaiRequestError, match=rf"{var}='{value}'.*{says}"):
        BonsaiConfig.from_env({var: value})
