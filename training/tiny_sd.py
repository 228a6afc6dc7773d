"""The shipped model's design: a tiny Stable-Diffusion-layout pipeline and its tokenizer.

Standard diffusers classes only (``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``,
``CLIPTokenizer``, the SD1.5 scheduler config), so the model runs through the SD family, the nodes
and ComfyUI unchanged. Native 512x512: the VAE downsamples by 8 as SD's does (latents 4 x 64 x 64).

Why these sizes (measured by ``training/measure_design.py``, figures in ``training/README.md``):
* compute goes where the composition is decided: thin at 64 x 64 and 32 x 32 (32 and 64 channels,
  no attention: 4096 tokens would dominate CPU time), wide with cross-attention at 16 x 16 and 8 x 8
  (128 and 256 channels); one resnet per level. 5.1 GFLOP a forward (SD1.5: ~340), 16.6 M weights;
* the VAE stays fp16 in a Bonsai folder and decodes 512 x 512 on the CPU, so it is kept narrow
  (32 channels at the two top levels): 57 GFLOP a decode;
* the text encoder reads a vocabulary of a few dozen words: 3 layers of 256 are plenty, and it stays
  fp16 too (3.6 MB), so the whole Bonsai folder is about 14 MB: under the 16 MB that one file
  brought back from a GPU run may be, as one tar.

Group norms of 8 groups, not SD's 32: at 32 channels, 32 groups normalise every channel over the
image on its own, and a flat-coloured image (all this model draws) then loses its colour at every
norm (the VAE did not learn colours so; with 4 channels a group the colour survives as a direction).
ComfyUI's own SD classes assume 32 groups (and SD's context widths), so in ComfyUI the model runs
through the Bonsai nodes (the engine), not as a core SD1 checkpoint.

``CONFIGS["tiny"]`` is the same layout, smaller, for the CPU tests of the training code.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 128, 256), norm_num_groups=8,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    cross_attention_dim=256, attention_head_dim=4,  # diffusers' name for the number of heads
)
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64, 128),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1, norm_num_groups=8, sample_size=512,
)
TEXT = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=256)

CONFIGS = {
    "shipped": {"unet": UNET, "vae": VAE, "text": TEXT, "resolution": 512},
    # the tests' size: every kind of layer, seconds on a CPU
    "tiny": {
        "unet": dict(UNET, sample_size=8, block_out_channels=(32, 32, 64, 64), cross_attention_dim=64,
                     attention_head_dim=2),
        "vae": dict(VAE, block_out_channels=(32, 32, 32, 32), sample_size=64),
        "text": dict(TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     projection_dim=64),
        "resolution": 64,
    },
}


# ------------------------------------------------------------------------------ the tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte -> printable character table (GPT-2's): the alphabet of a byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges learned on ``words`` (each counted once) until every word is one symbol.
    Symbols are written as CLIP writes them: the last character of a word carries ``</w>``."""
    table = _bytes_to_unicode()
    corpus = {w: [table[b] for b in w.encode()] for w in set(words)}
    for w, syms in corpus.items():
        syms[-1] += "</w>"
    merges = []
    while True:
        pairs = Counter()
        for syms in corpus.values():
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += 1
        if not pairs:
            return merges
        best = max(pairs.items(), key=lambda kv: (kv[1], [-ord(c) for c in kv[0][0] + " " + kv[0][1]]))[0]
        merges.append(best)
        for w, syms in corpus.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            corpus[w] = out


def write_tokenizer(folder: Path, words: list[str]) -> Path:
    """A CLIP tokenizer (vocab.json, merges.txt) whose every word of ``words`` is one token; every other
    text still tokenizes, byte by byte. Counts like SD's: ``<|startoftext|>`` + tokens + ``<|endoftext|>``,
    padded with ``<|endoftext|>`` to 77."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = learn_merges(words)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                       encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer",
        "do_lower_case": True}, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>"}, indent=2))
    return folder


def vocabulary() -> list[str]:
    """The words the shipped tokenizer makes single tokens: every caption word and the engine's
    default negative prompt (CFG's unconditional branch reads it by default)."""
    import re

    from bonsai_core.config import BonsaiConfig
    from bonsai_core.scenes import caption_words

    negative = re.findall(r"[a-z]+", BonsaiConfig().negative_default.lower())
    return sorted(set(caption_words()) | set(negative))


# ------------------------------------------------------------------------------ the pipeline
def build_components(config: str = "shipped", seed: int = 0, tokenizer_dir: Path | None = None):
    """(tokenizer, text_encoder, unet, vae) with fresh weights, full precision."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = CONFIGS[config]
    torch.manual_seed(seed)
    tok_dir = tokenizer_dir or Path(tempfile.mkdtemp(prefix="bonsai-tok-"))
    tok = CLIPTokenizer.from_pretrained(write_tokenizer(tok_dir, vocabulary()))
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                      **cfg["text"]))
    unet = UNet2DConditionModel(**cfg["unet"])
    vae = AutoencoderKL(**cfg["vae"])
    return tok, te, unet, vae


def save_pipeline(folder: Path, tok, te, unet, vae, extra_files: dict[str, str] | None = None,
                  scheduler: dict | None = None) -> Path:
    """Write a full-precision diffusers StableDiffusionPipeline folder (safetensors, SD1.5 scheduler
    with ``scheduler``'s changes)."""
    from tests.sd_fixtures import write_sd_scheduler_and_index

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder / "tokenizer")
    te.save_pretrained(folder / "text_encoder", safe_serialization=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)
    return write_sd_scheduler_and_index(folder, **(scheduler or {}))


def make_pipeline(folder: Path, config: str = "shipped", seed: int = 0) -> Path:
    """A random-weight pipeline folder of ``config`` (sizes and timings; the tests' teacher)."""
    tok, te, unet, vae = build_components(config, seed)
    return save_pipeline(folder, tok, te, unet, vae)
