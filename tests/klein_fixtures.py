"""Tiny FLUX.2 [klein] pipelines built offline from configs, for family, import and CLI tests.

Everything a ``Flux2KleinPipeline`` holds, at toy size:

* transformer: ``tests.flux2_fixtures`` ground truth (binary block linears, bf16 rest) with
  ``joint_attention_dim`` = 3 x the text encoder's width;
* text encoder: a 3-layer ``Qwen3ForCausalLM`` (hidden 64); the prompt embedding stacks the
  hidden states of layers ``OUT_LAYERS`` = (1, 2, 3) instead of (9, 18, 27), written to the
  folder's ``bonsai.json`` so the family and the diffusers pipeline read the same layers;
* tokenizer: a byte-level BPE ``Qwen2TokenizerFast`` with Qwen's special tokens and a chat template
  that honours ``enable_thinking`` like Qwen3's;
* VAE: ``AutoencoderKLFlux2`` with 4 levels of 16 channels (8x down, 32 latent channels) and
  non-trivial batch-norm running statistics;
* scheduler: ``FlowMatchEulerDiscreteScheduler`` with the klein settings (Flux2KleinPipeline's).

Public-layout repo folders (gemlite, MLX, GGUF) reuse the transformer writers of
``tests.flux2_fixtures`` and add the other parts where each public repo keeps them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from tests.flux2_fixtures import (
    TINY_CONFIG, GroundTruth, build_model, make_ground_truth, write_gemlite_fixture, write_gguf_fixture,
    write_mlx_fixture,
)
from tests.sd_fixtures import _bytes_to_unicode

TE_HIDDEN = 64
TE_VOCAB = 320  # the tiny tokenizer's 265 tokens, rounded up
TE_CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": TE_VOCAB,
    "hidden_size": TE_HIDDEN, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 32, "hidden_act": "silu", "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "attention_bias": False, "tie_word_embeddings": True,
}
OUT_LAYERS = (1, 2, 3)
KLEIN_CONFIG = dict(TINY_CONFIG, joint_attention_dim=TE_HIDDEN * len(OUT_LAYERS))

SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "time_shift_type": "exponential",
}

VAE_KWARGS = dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8, latent_channels=32)

# Qwen3's template, reduced to what a one-message, no-tools prompt uses (same text out).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
SPECIALS = ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]


def klein_ground_truth(seed: int = 0) -> GroundTruth:
    return make_ground_truth(seed=seed, config=KLEIN_CONFIG)


def make_tokenizer(folder: Path | None = None):
    """A byte-level BPE Qwen2TokenizerFast built offline (every byte a token, a few merges)."""
    from transformers import Qwen2TokenizerFast

    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    merges = [("Ġ", "a"), ("c", "a"), ("ca", "t"), ("t", "h"), ("th", "e"), ("Ġ", "the")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Qwen2TokenizerFast(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": SPECIALS})
    tok.chat_template = CHAT_TEMPLATE
    if folder is not None:
        tok.save_pretrained(folder)
    return tok


def make_text_encoder(vocab_size: int = TE_VOCAB, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**dict(TE_CONFIG, vocab_size=vocab_size))).eval()


def write_4bit_text_encoder(root: Path, kind: str, seed: int = 0) -> tuple[Path, dict]:
    """A public 4-bit text encoder folder (``"mlx"``: text_encoder-mlx-4bit/, ``"hqq"``:
    text_encoder-hqq-4bit/) written by ``tests.te_fixtures``; -> (folder, exact float64 values)."""
    from tests.te_fixtures import make_reference, write_hqq_te, write_mlx_te

    ref = make_reference(TE_CONFIG, seed)
    if kind == "mlx":
        return write_mlx_te(root, TE_CONFIG, ref)
    return write_hqq_te(root, TE_CONFIG, ref)


def make_vae(seed: int = 0):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(**VAE_KWARGS).eval()
    g = torch.Generator().manual_seed(seed + 7)
    n = vae.bn.running_mean.numel()
    vae.bn.running_mean.copy_(0.2 * torch.randn(n, generator=g))
    vae.bn.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return vae


def make_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)


def write_parts(root: Path, seed: int = 0, *, te_dir: str | None = "text_encoder", tok_dir: str = "tokenizer",
                vae_dir: str = "vae", scheduler_dir: str | None = "scheduler") -> dict[str, Path]:
    """Write dense text encoder, tokenizer, VAE (and scheduler) folders under ``root``."""
    root = Path(root)
    tok = make_tokenizer(root / tok_dir)
    assert len(tok) <= TE_VOCAB
    if te_dir is not None:
        make_text_encoder(TE_VOCAB, seed).save_pretrained(root / te_dir, safe_serialization=True)
    make_vae(seed).save_pretrained(root / vae_dir, safe_serialization=True)
    out = {"tokenizer": root / tok_dir, "vae": root / vae_dir}
    if te_dir is not None:
        out["text_encoder"] = root / te_dir
    if scheduler_dir is not None:
        make_scheduler().save_pretrained(root / scheduler_dir)
        out["scheduler"] = root / scheduler_dir
    return out


def write_bonsai_json(folder: Path) -> None:
    (Path(folder) / "bonsai.json").write_text(json.dumps({"text_encoder_out_layers": list(OUT_LAYERS)}))


# ---------------------------------------------------------------------------------------------
# Whole pipelines
# ---------------------------------------------------------------------------------------------
def build_pipeline(gt: GroundTruth, seed: int = 0, dtype=torch.float32):
    """An in-memory diffusers Flux2KleinPipeline with the ground-truth transformer (dequantized)."""
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline(
        scheduler=make_scheduler(), vae=make_vae(seed).to(dtype),
        text_encoder=make_text_encoder(TE_VOCAB, seed).to(dtype), tokenizer=make_tokenizer(),
        transformer=build_model(gt.config, gt.dense(torch.float32)).to(dtype), is_distilled=True)


def make_full_pipeline(folder: Path, seed: int = 0, gt: GroundTruth | None = None) -> Path:
    """A full-precision diffusers Flux2KleinPipeline folder (what ``bonsai convert`` takes)."""
    folder = Path(folder)
    gt = gt or klein_ground_truth(seed)
    pipe = build_pipeline(gt, seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    write_bonsai_json(folder)
    return folder


# ---------------------------------------------------------------------------------------------
# Public repo folders (where each public Bonsai Image 4B repo keeps each part)
# ---------------------------------------------------------------------------------------------
def make_gemlite_repo(root: Path, gt: GroundTruth, seed: int = 0, te: str = "hqq") -> tuple[Path, dict | None]:
    """``transformer-gemlite-int1/``, ``text_encoder-hqq-4bit/`` (HQQ 4-bit, or a dense TE when
    ``te="dense"``) with ``tokenizer/`` inside it as in the public repo, ``vae/``; no scheduler (the
    importer writes the default). -> (repo, exact text encoder values or None for dense)."""
    root = Path(root)
    write_gemlite_fixture(root, gt)
    truth = None
    if te == "hqq":
        _, truth = write_4bit_text_encoder(root, "hqq", seed)
    write_parts(root, seed, te_dir="text_encoder-hqq-4bit" if te == "dense" else None,
                tok_dir="text_encoder-hqq-4bit/tokenizer", scheduler_dir=None)
    write_bonsai_json(root)
    return root, truth


def make_mlx_repo(root: Path, gt: GroundTruth, seed: int = 0, te: str = "mlx") -> tuple[Path, dict | None]:
    """``transformer-packed-mflux/``, ``text_encoder-mlx-4bit/`` (MLX 4-bit, or dense when
    ``te="dense"``), ``tokenizer/`` (its chat template only in the repo's top-level
    ``chat_template.jinja``), ``vae/``, ``scheduler/``. -> (repo, exact text encoder values or None)."""
    root = Path(root)
    write_mlx_fixture(root, gt)
    truth = None
    if te == "mlx":
        _, truth = write_4bit_text_encoder(root, "mlx", seed)
    write_parts(root, seed, te_dir="text_encoder-mlx-4bit" if te == "dense" else None)
    tmpl = root / "tokenizer" / "chat_template.jinja"
    if tmpl.is_file():
        shutil.move(str(tmpl), root / "chat_template.jinja")
    cfg_path = root / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    write_bonsai_json(root)
    return root, truth


def make_gguf_and_parts(root: Path, gt: GroundTruth, seed: int = 0) -> tuple[Path, dict[str, Path]]:
    """A single ``.gguf`` transformer and separate part folders (for --text-encoder/--vae/--tokenizer)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path, _ = write_gguf_fixture(root / "bonsai-image-4b-q1_0.gguf", gt)
    parts = write_parts(root / "parts", seed, scheduler_dir=None)
    write_bonsai_json(parts["text_encoder"])  # how to read this encoder travels with it
    return path, parts
