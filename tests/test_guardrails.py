"""Guardrails: every rule in warn, clamp and refuse mode, and what the messages tell the user."""

import json
from dataclasses import replace

import pytest

from bonsai_core.config import FAMILY_DEFAULTS, GIB, BonsaiConfig
from bonsai_core.errors import BonsaiMemoryError, BonsaiRequestError
from bonsai_core.guardrails import (
    ALLOCATOR_SLACK,
    GuardrailReport,
    MemoryModel,
    Request,
    apply_prompt_defaults,
    check_request,
    estimate_memory_bytes,
    flux_step_elements,
    unet_step_elements,
    vae_decode_elements,
)

SD = FAMILY_DEFAULTS["sd_unet"]
KLEIN = FAMILY_DEFAULTS["flux2_klein"]


def words_count(text: str) -> int:
    """A stand-in tokenizer: one token per word, plus start and end tokens like CLIP."""
    return len(text.split()) + 2


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    """A real CLIPTokenizer built offline from a tiny vocab: each listed word is one token,
    anything else falls apart into letters."""
    from transformers import CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny_clip")
    words = "a cat dog red blue on the mat in style of painting".split() + [","]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz,":
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = []
    for w in words:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        cur = pieces[0]
        for p in pieces[1:]:
            if f"{cur} {p}" not in merges:
                merges.append(f"{cur} {p}")
            cur += p
            vocab.setdefault(cur, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(str(folder))


def check(mode="warn", family=SD, **fields):
    return check_request(Request(prompt=fields.pop("prompt", "a cat"), **fields), family=family, mode=mode)


# --- a good request ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["warn", "clamp", "refuse"])
def test_a_request_within_every_limit_passes_untouched(mode):
    report = check(mode, width=768, height=512)
    assert report.warnings == [] and report.notes == []
    assert report.request == Request(prompt="a cat", width=768, height=512)
    assert "all checks passed" in report.text()


def test_the_callers_request_is_never_changed():
    req = Request(prompt="a cat", width=1000, height=500, batch=20)
    check_request(req, family=SD, mode="clamp")
    assert (req.width, req.height, req.batch) == (1000, 500, 20)


def test_unknown_mode_is_refused():
    with pytest.raises(BonsaiRequestError, match=r"'strict'.*warn, clamp, refuse"):
        check("strict")


# --- resolution ----------------------------------------------------------------------------------


def test_warn_keeps_a_size_that_is_not_a_multiple_of_8_and_says_which():
    report = check("warn", width=500)
    assert report.request.width == 500
    assert any("width 500 is not a multiple of 8" in w and "504x512" in w for w in report.warnings)


def test_clamp_rounds_each_side_to_the_nearest_multiple():
    report = check("clamp", width=500, height=515)
    assert (report.request.width, report.request.height) == (504, 512)
    assert "500x515 -> 504x512" in report.notes[0]


def test_clamp_never_goes_below_one_multiple():
    assert (check("clamp", width=3, height=64).request.width) == 8


def test_refuse_names_the_value_and_the_rule():
    with pytest.raises(BonsaiRequestError, match=r"height 500 is not a multiple of 8.*use 512x504"):
        check("refuse", height=500)


@pytest.mark.parametrize("mode", ["warn", "clamp", "refuse"])
@pytest.mark.parametrize("bad", [0, -512, 512.5])
def test_a_size_that_is_not_a_positive_whole_number_is_refused_in_every_mode(mode, bad):
    with pytest.raises(BonsaiRequestError, match=rf"width {bad!r} is not a positive number of pixels"):
        check(mode, width=bad)


def test_warn_on_a_side_over_max_side():
    report = check("warn", width=1024, height=768)
    assert report.request.width == 1024
    assert any("width 1024 is over the largest side 768" in w and "upscale" in w for w in report.warnings)


def test_clamp_scales_an_oversized_request_down_keeping_the_aspect_ratio():
    report = check("clamp", width=1024, height=768)
    assert (report.request.width, report.request.height) == (768, 576)


def test_clamp_rounds_the_scaled_side_to_the_multiple():
    report = check("clamp", width=1000, height=600)  # 768 x 460.8
    assert (report.request.width, report.request.height) == (768, 464)


def test_refuse_an_oversized_side_and_say_what_to_use():
    with pytest.raises(BonsaiRequestError, match=r"height 1024 is over the largest side 768.*use 288x768"):
        check("refuse", width=384, height=1024)


def test_max_side_can_be_raised_by_the_caller():
    report = check_request(Request("a cat", width=1024, height=1024), family=SD, mode="refuse", max_side=1024)
    assert report.warnings == []


def test_klein_sizes_are_multiples_of_32_up_to_2048():
    assert check("warn", KLEIN, width=1024, height=1024, steps=4, guidance=1.0).warnings == []
    report = check("clamp", KLEIN, width=1000, height=3000, steps=4, guidance=1.0)
    assert (report.request.width, report.request.height) == (672, 2048)
    with pytest.raises(BonsaiRequestError, match="not a multiple of 32"):
        check("refuse", KLEIN, width=1040, height=1024, steps=4, guidance=1.0)


# --- steps ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["warn", "clamp", "refuse"])
@pytest.mark.parametrize("bad", [0, -3, 151, 2.5])
def test_nonsense_steps_are_refused_in_every_mode(mode, bad):
    with pytest.raises(BonsaiRequestError, match=rf"steps {bad!r} is not a whole number in 1-150.*20-28"):
        check(mode, steps=bad)


def test_steps_outside_the_advice_get_a_warning_in_warn_mode():
    report = check("warn", steps=40)
    assert report.request.steps == 40
    assert any("40 steps" in w and "20-28 advised" in w for w in report.warnings)


@pytest.mark.parametrize("mode", ["clamp", "refuse"])
def test_steps_advice_is_only_advice_outside_warn_mode(mode):
    report = check(mode, steps=40)
    assert report.request.steps == 40 and report.warnings == []


def test_klein_advice_is_4_to_8_steps():
    report = check("warn", KLEIN, width=1024, height=1024, steps=24, guidance=1.0)
    assert any("24 steps" in w and "4-8 advised" in w for w in report.warnings)


# --- guidance ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["warn", "clamp", "refuse"])
@pytest.mark.parametrize("bad", [-1.0, 31.0, float("nan")])
def test_guidance_outside_0_to_30_is_refused_in_every_mode(mode, bad):
    with pytest.raises(BonsaiRequestError, match=r"guidance .* is outside 0-30"):
        check(mode, guidance=bad)


def test_guidance_on_a_distilled_model_is_a_warning():
    report = check("refuse", KLEIN, width=1024, height=1024, steps=4, guidance=3.5)
    assert report.request.guidance == 3.5
    assert any("guidance 3.5 has no effect" in w and "guidance-distilled" in w for w in report.warnings)


# --- batch ---------------------------------------------------------------------------------------


def test_batch_over_16_warns_clamps_or_refuses():
    assert any("batch 20 is over the 16" in w for w in check("warn", batch=20).warnings)
    assert check("clamp", batch=20).request.batch == 16
    with pytest.raises(BonsaiRequestError, match=r"batch 20 is over the 16"):
        check("refuse", batch=20)


@pytest.mark.parametrize("mode", ["warn", "clamp", "refuse"])
def test_batch_zero_is_refused_in_every_mode(mode):
    with pytest.raises(BonsaiRequestError, match=r"batch 0 is not a number of images 1-16"):
        check(mode, batch=0)


def test_one_error_lists_every_problem():
    with pytest.raises(BonsaiRequestError) as err:
        check("refuse", steps=0, guidance=99.0, width=1000)
    text = str(err.value)
    assert "steps 0" in text and "guidance 99.0" in text and "width 1000" in text


# --- prompt --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["warn", "clamp", "refuse"])
def test_an_empty_prompt_is_a_warning(mode):
    assert any("prompt is empty" in w for w in check(mode, prompt="  ").warnings)


def test_prompt_length_is_not_checked_without_a_tokenizer():
    report = check("refuse", prompt="cat " * 500)
    assert report.prompt_tokens is None and report.warnings == []


def test_prompt_tokens_are_counted_with_count_tokens():
    report = check_request(Request("a red cat"), family=SD, count_tokens=words_count)
    assert report.prompt_tokens == 5


def test_warn_on_a_long_prompt_quotes_the_words_that_will_be_cut():
    prompt = "w " * 75 + "first cut words here"
    report = check_request(Request(prompt), family=SD, count_tokens=words_count)
    assert report.request.prompt == prompt
    (warning,) = report.warnings
    assert "prompt is 81 tokens, over the 77" in warning
    assert '"first cut words here"' in warning


def test_clamp_cuts_a_long_prompt_at_a_word_with_only_a_counter():
    prompt = "w " * 75 + "first cut words here"
    report = check_request(Request(prompt), family=SD, mode="clamp", count_tokens=words_count)
    assert report.request.prompt == ("w " * 75).strip()
    assert report.prompt_tokens == 77
    assert "81 to 77 tokens" in report.notes[0] and "first cut words here" in report.notes[0]


def test_refuse_a_long_prompt_naming_its_length_and_the_limit():
    with pytest.raises(BonsaiRequestError, match=r"prompt is 81 tokens, over the 77"):
        check_request(Request("w " * 79), family=SD, mode="refuse", count_tokens=words_count)


def test_clip_tokenizer_counts_special_tokens(clip_tokenizer):
    report = check_request(Request("a cat, on the mat"), family=SD, tokenizer=clip_tokenizer)
    assert report.prompt_tokens == 8  # <start> a cat , on the mat <end>


def test_clamp_truncates_an_overlong_prompt_at_the_clip_token_limit(clip_tokenizer):
    prompt = "a red cat on the mat " * 15 + "in the style of painting"  # 90 + 5 words
    report = check_request(Request(prompt), family=SD, mode="clamp", tokenizer=clip_tokenizer)
    assert report.prompt_tokens == 77
    kept = "a red cat on the mat " * 12 + "a red cat"  # the first 75 words, + start and end
    assert report.request.prompt == kept == clip_tokenizer.decode(
        clip_tokenizer(prompt, add_special_tokens=False).input_ids[:75]
    )
    assert "97 to 77 tokens" in report.notes[0]


def test_warn_on_an_overlong_clip_prompt_shows_the_first_cut_words(clip_tokenizer):
    prompt = "a cat " * 37 + "on the blue mat in the style of painting"
    report = check_request(Request(prompt), family=SD, tokenizer=clip_tokenizer)
    assert report.prompt_tokens == 85
    assert any('"the blue mat in the style of painting"' in w for w in report.warnings)


def test_a_long_negative_prompt_is_checked_too_for_cfg_models():
    req = Request("a cat", negative_prompt="x " * 80)
    report = check_request(req, family=SD, mode="clamp", count_tokens=words_count)
    assert report.request.negative_prompt == ("x " * 75).strip()
    assert "negative prompt cut from 82 to 77" in report.notes[0]


def test_klein_reads_512_prompt_tokens():
    req = Request("w " * 300, width=1024, height=1024, steps=4, guidance=1.0)
    assert check_request(req, family=KLEIN, mode="refuse", count_tokens=words_count).warnings == []


# --- memory --------------------------------------------------------------------------------------


def check_memory(mode, estimate, available, batch=1):
    return check_request(
        Request("a cat", batch=batch), family=SD, mode=mode,
        memory_estimate_bytes=estimate, memory_available_bytes=available,
    )


def test_memory_is_fine_when_the_estimate_fits():
    report = check_memory("refuse", 2 * GIB, 6 * GIB)
    assert report.warnings == []


def test_warn_when_the_estimate_is_over_what_is_available():
    report = check_memory("warn", 8 * GIB, 6 * GIB)
    (warning,) = report.warnings
    assert "8.00 GiB" in warning and "6.00 GiB" in warning
    assert "smaller size" in warning and "fewer images" in warning and "cpu" in warning


def test_refuse_over_memory_raises_bonsai_memory_error():
    with pytest.raises(BonsaiMemoryError, match=r"needs about 8.00 GiB but 6.00 GiB"):
        check_memory("refuse", 8 * GIB, 6 * GIB)


def test_clamp_reduces_the_batch_until_it_fits():
    def estimate(r):  # 1 GiB of weights + 1 GiB per image
        return GIB + r.batch * GIB

    report = check_memory("clamp", estimate, 4 * GIB, batch=8)
    assert report.request.batch == 3
    assert "batch 8 -> 3" in report.notes[0]


def test_clamp_refuses_when_even_one_image_does_not_fit():
    with pytest.raises(BonsaiMemoryError, match="fewer images"):
        check_memory("clamp", lambda r: 10 * GIB, 4 * GIB, batch=4)


def test_clamp_with_a_fixed_estimate_cannot_know_a_smaller_batch_fits_so_refuses():
    with pytest.raises(BonsaiMemoryError):
        check_memory("clamp", 8 * GIB, 6 * GIB, batch=4)


def _sd15_model(dtype_bytes=2, cfg=True, graph=False, unpacked=0):
    from tests.sd_fixtures import SD15_UNET_CONFIG

    vae = dict(block_out_channels=(128, 256, 512, 512))
    return MemoryModel(resident_bytes=GIB, dtype_bytes=dtype_bytes,
                       step_elements=lambda w, h: unet_step_elements(SD15_UNET_CONFIG, w, h),
                       decode_elements=lambda w, h: vae_decode_elements(vae, w, h),
                       rows_per_image=2 if cfg else 1, graph_pool=graph, unpacked_bytes=unpacked)


def test_memory_estimate_is_the_largest_phase_and_grows_with_size_batch_and_dtype():
    one = estimate_memory_bytes(_sd15_model(), width=512, height=512, batch=1)
    assert one > GIB
    assert estimate_memory_bytes(_sd15_model(), width=512, height=512, batch=2) > one
    assert estimate_memory_bytes(_sd15_model(), width=768, height=512, batch=1) > one
    assert estimate_memory_bytes(_sd15_model(dtype_bytes=4), width=512, height=512, batch=1) > one
    phases = _sd15_model().phases(512, 512, 1)
    assert one == int(max(phases.values()) * ALLOCATOR_SLACK)
    # SD1.5 at 512x512 in fp16: the VAE decoder at full size is the peak, about 0.45 GiB on the weights
    assert max(phases, key=phases.get) == "decode"
    assert 0.3 * GIB < phases["decode"] - GIB < 0.6 * GIB


def test_memory_estimate_counts_the_graph_pool_the_unpacked_layer_and_a_lent_text_encoder():
    base = _sd15_model().phases(512, 512, 1)
    graph = _sd15_model(graph=True, unpacked=100).phases(512, 512, 1)
    assert graph["denoise"] == base["denoise"] + (base["denoise"] - GIB) + 100
    lent = MemoryModel(resident_bytes=GIB, dtype_bytes=2, step_elements=lambda w, h: 0,
                       decode_elements=lambda w, h: 0, lent_bytes=8 * GIB)
    assert estimate_memory_bytes(lent, width=512, height=512, batch=1) >= 9 * GIB


def test_memory_estimate_for_klein_4b_shapes():
    klein = dict(num_attention_heads=24, attention_head_dim=128, mlp_ratio=3.0)
    model = MemoryModel(resident_bytes=GIB, dtype_bytes=2,
                        step_elements=lambda w, h: flux_step_elements(klein, w, h),
                        decode_elements=lambda w, h: vae_decode_elements(dict(block_out_channels=(128, 256, 512, 512)),
                                                                         w, h))
    small, big = (estimate_memory_bytes(model, width=s, height=s, batch=1) for s in (512, 1024))
    assert GIB < small < big < 4 * GIB


# --- the report ----------------------------------------------------------------------------------


def test_report_text_lists_values_notes_and_warnings():
    req = Request("a cat", width=1024, height=768, steps=40)
    report = check_request(req, family=SD, mode="clamp", count_tokens=words_count)
    text = report.text()
    assert isinstance(report, GuardrailReport)
    assert "768x576" in text and "40 steps" in text and "prompt 4 tokens" in text
    assert "clamped: size 1024x768 -> 768x576" in text
    text = check("warn", steps=40).text()
    assert "warning: 40 steps" in text


# --- prompt defaults -----------------------------------------------------------------------------


def test_default_negative_fills_an_empty_negative():
    config = BonsaiConfig()
    assert apply_prompt_defaults("a cat", "", config=config) == ("a cat", config.negative_default)
    assert apply_prompt_defaults("a cat", "dogs", config=config) == ("a cat", "dogs")
    assert apply_prompt_defaults("a cat", "", config=config, use_default_negative=False) == ("a cat", "")


def test_style_prefix_only_when_asked():
    config = BonsaiConfig()
    assert apply_prompt_defaults("a cat", "x", config=config)[0] == "a cat"
    styled = apply_prompt_defaults("a cat", "x", config=config, use_style_prefix=True)[0]
    assert styled == "digital painting, concept art, cinematic lighting, a cat"
    on_by_config = replace(config, use_style_prefix=True)
    assert apply_prompt_defaults("a cat", "x", config=on_by_config)[0] == styled
    assert apply_prompt_defaults(styled, "x", config=on_by_config)[0] == styled  # not twice


def test_a_cuda_vae_decode_adds_twelve_full_size_activations_for_the_allocator_and_cudnn():
    vae = dict(block_out_channels=(128, 256, 512, 512))
    # hand-worked: SD1.5's VAE at 512² -> the full-size level is 128 channels x 512 x 512
    assert vae_decode_elements(vae, 512, 512, cuda=True) - vae_decode_elements(vae, 512, 512) == 12 * 128 * 512 * 512
    # the H100 run it was calibrated on (benchmarks/results/h100/memory_estimate): SD1.5 at 512² in fp16
    # reserved 2.12e9 bytes; the decode phase on its 545,853,630 resident bytes now lands within 25 %
    decode = 545_853_630 + 2 * vae_decode_elements(vae, 512, 512, cuda=True)
    assert 0.75 < decode * ALLOCATOR_SLACK / 2_120_220_672 < 1.25
