"""FLUX.2 [klein] family (the architecture of PrismML's Bonsai Image 4B): Qwen3 text encoder,
``Flux2Transformer2DModel`` (Bonsai Q1_0 or dense), ``AutoencoderKLFlux2``, rectified flow.

The math is diffusers' ``Flux2KleinPipeline``, reached through its own static helpers rather than
copied: prompt embeddings (``_get_qwen3_prompt_embeds``: chat template with ``enable_thinking``
false, padded/truncated to 512 tokens, hidden states of layers 9, 18, 27 interleaved), text and
latent position ids (``_prepare_text_ids`` / ``_prepare_latent_ids``), latent packing
(``_pack_latents`` / ``_unpack_latents_with_ids``) and the 2x2 unpatchify before the VAE
(``_unpatchify_latents``). The schedule is ``sampling.flow_schedule`` (FlowMatchEuler with the
empirical resolution shift), the transformer is told ``sigma`` (``sampling.model_timestep``) and
predicts the velocity, which ``sampling.to_x0`` turns into the data prediction the shared
samplers walk with.

Memory: on CUDA the text encoder stays resident on the device when it fits the memory budget
beside a whole run (a 4-bit one usually does: ``placement.py`` decides, from the bytes it measures
on the device and the guardrails' estimate of the run; the engine calls ``place_text_encoder``
after loading and ``observe_peak`` after every run, which parks it if a run measured over the
budget). Otherwise it is kept in host memory and lent to the device only while it encodes a
prompt (embeddings are cached per prompt), or streamed layer by layer when even lending it would
not fit; during denoising the device then holds only the transformer and the VAE
(``denoising_modules``). The encode runs the text encoder's decoder stack alone (``.model``): the
prompt embedding is made of hidden states, and the language-model head would only add a
vocabulary-sized product (and, for a 4-bit tied head, a dense copy of the embedding).

A model folder may hold a top-level ``bonsai.json``; its ``text_encoder_out_layers`` (default
``(9, 18, 27)``) says which hidden states form the prompt embedding (tiny test models have fewer
layers).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import device as devices
from .. import sampling
from ..config import FAMILY_DEFAULTS
from ..loader import load_component
from ..errors import BonsaiCheckpointError, BonsaiRequestError
from .base import Family, load_vae_decoder
from .sd_unet import load_tokenizer, read_scheduler_config

log = logging.getLogger(__name__)

TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)
MAX_SEQUENCE_LENGTH = 512
SETTINGS_FILE = "bonsai.json"
REQUIRED = ("transformer", "text_encoder", "tokenizer", "vae")
LARGE_TEXT_ENCODER_BYTES = 2 * 2**30  # above this, a CPU run keeps the text encoder in bf16


def _pipeline():
    """diffusers' Flux2KleinPipeline class: its static methods are the reference math."""
    try:
        from diffusers import Flux2KleinPipeline
    except ImportError as exc:  # pragma: no cover - depends on the installed diffusers
        import diffusers

        raise BonsaiCheckpointError(
            f"diffusers {diffusers.__version__} has no Flux2KleinPipeline; FLUX.2 [klein] models need "
            "diffusers >= 0.36: pip install -U diffusers") from exc
    return Flux2KleinPipeline


def read_settings(folder: Path) -> dict:
    """The folder's ``bonsai.json`` (empty when absent)."""
    path = Path(folder) / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BonsaiCheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise BonsaiCheckpointError(f"{path}: expected a JSON object")
    return data


def text_encoder_out_layers(folder: Path) -> tuple[int, ...]:
    raw = read_settings(folder).get("text_encoder_out_layers", TEXT_ENCODER_OUT_LAYERS)
    try:
        layers = tuple(int(v) for v in raw)
    except (TypeError, ValueError):
        raise BonsaiCheckpointError(
            f"{Path(folder) / SETTINGS_FILE}: text_encoder_out_layers must be a list of layer numbers, "
            f"got {raw!r}") from None
    if not layers:
        raise BonsaiCheckpointError(f"{Path(folder) / SETTINGS_FILE}: text_encoder_out_layers is empty")
    return layers


def drop_unread_layers(text_encoder: nn.Module, out_layers) -> int:
    """Drop the decoder layers past the deepest hidden state the prompt embedding reads; the number
    dropped. FLUX.2 [klein] reads hidden states 9, 18 and 27 of Qwen3-4B's 36 layers: the last 9 (a
    quarter of the text encoder's weights and compute) never reach the image. The final norm goes
    too (replaced by identity): with the layers gone, the last hidden state is the one read, and it
    must stay the raw layer output the full model gives. Negative layer numbers (counted from the
    end) keep every layer."""
    model = getattr(text_encoder, "model", text_encoder)
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or any(int(v) < 0 for v in out_layers):
        return 0
    keep = max(1, max(int(v) for v in out_layers))
    if keep >= len(layers):
        return 0
    dropped = len(layers) - keep
    model.layers = nn.ModuleList(list(layers)[:keep])
    if isinstance(getattr(model, "norm", None), nn.Module):
        model.norm = nn.Identity()
    config = getattr(text_encoder, "config", None)
    if config is not None and getattr(config, "num_hidden_layers", None) is not None:
        config.num_hidden_layers = keep
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = config.layer_types[:keep]
    return dropped


def unreadable_layers(read, n_layers: int) -> list[int]:
    """The numbers in ``read`` that name no hidden state of an ``n_layers``-layer text encoder, which
    has ``n_layers + 1`` of them: 0 to ``n_layers``, or counted from the end, -1 to ``-(n_layers + 1)``."""
    return [v for v in read if not -(n_layers + 1) <= v <= n_layers]


class ReadHiddenStates(nn.Module):
    """The text encoder's decoder stack as diffusers' ``_get_qwen3_prompt_embeds`` calls it, keeping
    only the hidden states the prompt embedding reads.

    Asked for ``output_hidden_states``, transformers keeps every layer's output until the forward
    ends (28 of them for klein's 27 layers: 70 MiB at 512 tokens in bf16), at the point where the
    encode's memory peaks; forward hooks keep the three it reads instead. Hidden state ``i`` is what
    transformers numbers so: 0 the token embeddings, ``i`` the output of layer ``i``, the last the
    final norm's output; negative numbers count from the end. (transformers' own layer selection,
    ``output_hidden_states=[...]``, numbers the layers differently from one release to the next.)
    The forward returns an object whose ``hidden_states[i]`` answers every number asked for."""

    def __init__(self, stack: nn.Module, read, where="the text encoder"):
        super().__init__()
        self.stack = stack
        self.read = tuple(int(v) for v in read)
        self.where = where  # named in a refusal: the model folder

    @property
    def device(self) -> torch.device:
        device = getattr(self.stack, "device", None)
        return device if device is not None else next(self.stack.parameters()).device

    def forward(self, input_ids, attention_mask=None, output_hidden_states=True, use_cache=False):
        from types import SimpleNamespace

        model = getattr(self.stack, "model", self.stack)  # a streamed encoder runs whole (its hooks are on top)
        n = len(model.layers)
        points = {0: model.embed_tokens, n: model.norm, **{i: model.layers[i - 1] for i in range(1, n)}}
        kept: dict[int, torch.Tensor] = {}

        def keeper(i):
            def hook(module, args, out):
                kept[i] = out[0] if isinstance(out, tuple) else out
            return hook

        if unreadable_layers(self.read, n):
            raise BonsaiCheckpointError(
                f"{self.where}: the prompt embedding reads hidden states {list(self.read)} but the text encoder has "
                f"{n} layers (hidden states 0 to {n}, or -{n + 1} to -1); set text_encoder_out_layers in "
                f"{SETTINGS_FILE}")
        wanted = {v % (n + 1) for v in self.read}  # two numbers may name one state ((n, -1)): kept once
        hooks = [points[i].register_forward_hook(keeper(i)) for i in wanted]
        try:
            self.stack(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        return SimpleNamespace(hidden_states={v: kept[v % (n + 1)] for v in self.read})


class HostEmbedding(nn.Module):
    """A token-embedding table kept in host memory whatever device its module moves to: a lookup
    gathers the prompt's rows on the host and sends only those to the ids' device. The table is a
    plain attribute, not a parameter, so ``.to()``, lending and memory counts pass it by."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table.detach()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids.to(self.table.device), self.table)
        return rows.to(ids.device, non_blocking=True)


def embedding_to_host(text_encoder: nn.Module) -> int:
    """Keep the text encoder's token embeddings in host memory (``HostEmbedding``); the bytes that no
    longer go to the GPU. Qwen3-4B's table is 389M weights (0.78 GB in bf16), of which a prompt
    reads a few hundred rows. Its tied language-model head, never used for a prompt embedding, gives
    the hidden states through unchanged, so the table is not kept alive on the device through it."""
    model = getattr(text_encoder, "model", text_encoder)
    embed = getattr(model, "embed_tokens", None)
    if type(embed) is not nn.Embedding or embed.max_norm is not None:
        return 0
    table = embed.weight
    head = getattr(text_encoder, "lm_head", None)
    if head is not None and getattr(head, "weight", None) is not table:
        return 0  # an untied head: leave the model as it is
    model.embed_tokens = HostEmbedding(table)
    if head is not None:
        text_encoder.lm_head = nn.Identity()
    from ..quant.layers import tensor_nbytes

    return tensor_nbytes(table)


class HostParked:
    """A module whose weights live in pinned host memory and are lent to the GPU for a forward.

    Lending is one fast copy per tensor (pinned memory streams at full PCIe speed); parking costs
    nothing, because the host copy was never dropped: no copy back, no fresh host allocation.
    Where pinning is refused (locked-memory limits), the plain host tensors are used. The module's
    own parameter and buffer slots are swapped (tied weights stay tied): a packed weight's parts
    travel with it, which ``param.data = ...`` across devices cannot promise.
    """

    def __init__(self, module: nn.Module):
        self.slots: list[tuple[dict, str, int]] = []  # (the module's _parameters or _buffers, name, tensor)
        self.host: list[torch.Tensor] = []
        groups: dict[int, tuple[torch.Tensor, list]] = {}  # every tensor once, with the slots that hold it
        for mod in module.modules():
            for store in (mod._parameters, mod._buffers):
                for name, t in store.items():
                    if t is not None:
                        groups.setdefault(id(t), (t, []))[1].append((store, name))
        # one tensor at a time: its pinned copy replaces it in every slot before the next is pinned,
        # so the original is freed as we go (host memory never holds two text encoders)
        for key in list(groups):
            t, where = groups.pop(key)
            h = self._pinned(t)
            del t
            for store, name in where:
                store[name] = h
                self.slots.append((store, name, len(self.host)))
            self.host.append(h)

    @staticmethod
    def _like(t: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """``t`` as what ``slot`` is: a frozen parameter for a parameter, else the tensor itself."""
        return nn.Parameter(t, requires_grad=False) if isinstance(slot, nn.Parameter) else t

    @staticmethod
    def _pinned(t: torch.Tensor) -> torch.Tensor:
        try:
            pinned = t.detach().pin_memory()  # a packed weight pins its parts (PackedTensor.pin_memory)
        except RuntimeError:
            return t
        return HostParked._like(pinned, t)

    def lend(self, device: torch.device) -> None:
        lent = [self._like(h.detach().to(device, non_blocking=True), h) for h in self.host]
        for store, name, i in self.slots:
            store[name] = lent[i]

    def park(self) -> None:
        for store, name, i in self.slots:
            store[name] = self.host[i]


class Flux2KleinFamily(Family):
    name = "flux2_klein"
    defaults = FAMILY_DEFAULTS["flux2_klein"]
    cuda_dtype = torch.bfloat16  # FLUX.2 and Qwen3 are bf16 models; fp16 activations can overflow
    max_sequence_length = MAX_SEQUENCE_LENGTH

    def __init__(self, folder: Path, index: dict, device: torch.device, dtype: torch.dtype):
        super().__init__(folder, index, device, dtype)
        missing = [c for c in REQUIRED if not (isinstance(index.get(c), list) and index[c][0])]
        if missing:
            raise BonsaiCheckpointError(
                f"{folder}/model_index.json: a FLUX.2 [klein] model needs {', '.join(REQUIRED)}; "
                f"missing {', '.join(missing)}. Import the model again with `bonsai import`")
        self.out_layers = text_encoder_out_layers(folder)
        self._tokenizer = load_tokenizer(folder, index["tokenizer"])
        if not getattr(self._tokenizer, "chat_template", None):
            raise BonsaiCheckpointError(
                f"{folder / 'tokenizer'}: the tokenizer has no chat template; FLUX.2 [klein] prompts are "
                "written with Qwen3's (copy chat_template.jinja from the model's repo into tokenizer/)")
        # The text encoder stays on the CPU; _encode moves it to the device for the forward only.
        # On a CPU-only run a large one stays in 16-bit (Qwen3-4B is 8 GB in bf16, 16 GB in fp32):
        # its embeddings are cast to the compute dtype after encoding.
        te_file_bytes = sum(p.stat().st_size for p in (folder / "text_encoder").glob("*.safetensors"))
        big = te_file_bytes > LARGE_TEXT_ENCODER_BYTES
        self.te_dtype = torch.bfloat16 if (device.type == "cpu" and dtype == torch.float32 and big) else dtype
        self.text_encoder = load_component(folder, "text_encoder", index["text_encoder"], self.te_dtype, "cpu")
        self._te_offloaded = False
        self._te_parked: HostParked | None = None
        self.te_placement = None  # placement.Placement once place_text_encoder ran (CUDA)
        self.max_device_bytes: int | None = None  # the budget the engine gives place_text_encoder
        self._te_device_bytes: int | None = None  # what the text encoder measured on the device
        self._te_demoted = False  # parked after a run measured over the budget: never promoted again
        self._te_promoted = False  # resident because a run measured room for it (the estimate said no)
        n_layers = getattr(self.text_encoder.config, "num_hidden_layers", None)
        if n_layers is not None and unreadable_layers(self.out_layers, n_layers):
            raise BonsaiCheckpointError(
                f"{folder}: the prompt embedding reads hidden states {list(self.out_layers)} but the text encoder "
                f"has {n_layers} layers; set text_encoder_out_layers in {SETTINGS_FILE}")
        self.te_layers_dropped = drop_unread_layers(self.text_encoder, self.out_layers) \
            if isinstance(self.text_encoder, nn.Module) else 0
        self.te_embedding_on_host = embedding_to_host(self.text_encoder) \
            if device.type == "cuda" and isinstance(self.text_encoder, nn.Module) else 0
        self.transformer = load_component(folder, "transformer", index["transformer"], dtype, device)
        self.vae = load_vae_decoder(folder, index["vae"], dtype, device)
        if not hasattr(self.vae, "bn"):
            raise BonsaiCheckpointError(
                f"{folder / 'vae'}: {type(self.vae).__name__} has no batch-norm statistics; FLUX.2 [klein] needs "
                "AutoencoderKLFlux2")
        self.scheduler_config = read_scheduler_config(folder)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_factor = self.vae_scale * 2  # VAE downsampling x 2x2 patches: 16 for FLUX.2

    # --- modules ------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder, "transformer": self.transformer, "vae": self.vae}

    def denoising_modules(self) -> dict[str, nn.Module]:
        """What sits on the device while the sampler runs: no text encoder."""
        return {"transformer": self.transformer, "vae": self.vae}

    def tokenizer(self):
        return self._tokenizer

    def memory_model(self, cfg: bool, text_encoder: bool = True):
        """On CUDA the text encoder is on the card for the whole run when placement kept it resident at
        load, else only while it encodes (lent from host memory; a measured promotion keeps this count);
        elsewhere it shares the one memory with everything else for the whole run. ``text_encoder=False``: a run without its weights, what
        placement sets the measured text encoder beside (its decode is tiled to fit beside the measured
        text encoder: the decode budget less it, the tile the run itself then chooses)."""
        from .. import cuda_graph
        from ..guardrails import (ALLOCATOR_SLACK, MemoryModel, flux_step_elements, text_encode_elements,
                                  vae_decode_elements)
        from ..quant.layers import module_nbytes

        te_bytes = module_nbytes(self.text_encoder) if text_encoder and isinstance(self.text_encoder, nn.Module) else 0
        # an encoder promoted by a measured run is estimated as the parked one it was: the measurement
        # overrules the estimate (the guardrails would otherwise warn about, or refuse, what just ran)
        on_card_all_run = self.device.type != "cuda" or (self.te_resident and not self._te_promoted)
        lent = te_bytes if self.device.type == "cuda" and not self._te_offloaded and not on_card_all_run else 0
        resident = self.weight_bytes() + (te_bytes if on_card_all_run else 0)
        tcfg, vcfg, text = self.transformer.config, self.vae.config, self.max_sequence_length
        vae = self.vae_memory(cuda=self.device.type == "cuda")
        if not text_encoder and vae["decode_budget_bytes"] is not None and self._te_device_bytes is not None:
            # the budget (headroom taken) less the encoder with the run's allocator slack on it: the run,
            # with the encoder resident, checks (rest + encoder) x slack against the whole budget
            vae["decode_budget_bytes"] -= int(self._te_device_bytes * ALLOCATOR_SLACK)
        return MemoryModel(
            resident_bytes=resident, dtype_bytes=torch.empty(0, dtype=self.dtype).element_size(),
            step_elements=lambda w, h: flux_step_elements(tcfg, w, h, text),
            decode_elements=lambda w, h: vae_decode_elements(vcfg, w, h, cuda=self.device.type == "cuda"),
            encode_elements=text_encode_elements(self.text_encoder.config, text, True),
            lent_bytes=lent, unpacked_bytes=self.unpacked_bytes(), rows_per_image=2 if cfg else 1,
            graph_pool=cuda_graph.enabled(self.device), **vae)

    # --- prompts ------------------------------------------------------------------------------
    def chat_text(self, prompt: str) -> str:
        """The prompt as the text encoder reads it (Qwen3 chat template, thinking off), as diffusers writes it."""
        return self._tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True, enable_thinking=False)

    def count_tokens(self, text: str) -> int:
        """Tokens of the chat-templated prompt: what is truncated at 512."""
        return len(self._tokenizer(self.chat_text(text), verbose=False).input_ids)

    def _fits_on_device(self, nbytes: int) -> bool:
        if self.device.type != "cuda":
            return True  # MPS shares memory with the CPU
        free, _ = torch.cuda.mem_get_info(self.device)
        if self.max_device_bytes is None:
            return nbytes < 0.85 * free
        from .. import placement
        from ..guardrails import text_encode_elements

        encode = text_encode_elements(self.text_encoder.config, self.max_sequence_length, True) * \
            torch.empty(0, dtype=self.dtype).element_size()
        return placement.place_lent(nbytes, torch.cuda.memory_allocated(self.device), encode, self.max_device_bytes,
                                    free).where == placement.PARKED

    @property
    def te_resident(self) -> bool:
        from .. import placement

        return self.te_placement is not None and self.te_placement.where == placement.RESIDENT

    def place_text_encoder(self, budget_bytes: int, run_bytes) -> None:
        """On CUDA: put the text encoder on the device, measure what it takes there, and keep it there
        when ``placement.place_text_encoder`` says it fits ``budget_bytes`` beside a run of
        ``run_bytes()`` bytes (the guardrails' estimate); else back to host memory (lent per prompt)."""
        from .. import placement

        self.max_device_bytes = int(budget_bytes)
        if self.device.type != "cuda" or not isinstance(self.text_encoder, nn.Module):
            return
        before = torch.cuda.memory_allocated(self.device)
        try:
            self._move_text_encoder(self.device)
        except torch.cuda.OutOfMemoryError:
            self._move_text_encoder("cpu")
            devices.free_cache(self.device)
            self.te_placement = placement.Placement(placement.PARKED, "the text encoder does not fit the device")
            return
        te_bytes = torch.cuda.memory_allocated(self.device) - before
        self._te_device_bytes = te_bytes
        free, _ = torch.cuda.mem_get_info(self.device)
        run = int(run_bytes())
        self.te_placement = placement.place_text_encoder(te_bytes, run, budget_bytes, free + te_bytes)
        if not self.te_resident:
            self._move_text_encoder("cpu")
            devices.free_cache(self.device)

    def _move_text_encoder(self, device) -> None:
        """The whole text encoder to ``device``. A parked copy is forgotten first: ``.to()`` changes
        dense parameters in place, and the parked copies are the module's parameters while parked."""
        self._te_parked = None
        self.text_encoder.to(device)

    def observe_peak(self, peak_bytes: int | None) -> str | None:
        """After a run (``placement.after_run``): a resident text encoder whose run measured over the
        budget is parked from now on, and never comes back (returns the warning to show); a parked one
        whose run measured small enough to hold it beside is kept on the device from the next run on
        (returns None; a move that runs out of memory leaves it parked)."""
        from .. import placement

        if self.te_placement is None or self.max_device_bytes is None:
            return None
        te_bytes = None if self._te_demoted or self._te_offloaded else self._te_device_bytes
        device_bytes = None
        if te_bytes is not None and self.te_placement.where == placement.PARKED:
            free, _ = torch.cuda.mem_get_info(self.device)
            device_bytes = free + torch.cuda.memory_reserved(self.device)
        new = placement.after_run(self.te_placement, peak_bytes, self.max_device_bytes, te_bytes, device_bytes)
        if new is None:
            return None
        if new.where == placement.RESIDENT:
            try:
                self._move_text_encoder(self.device)
            except torch.cuda.OutOfMemoryError:
                self._move_text_encoder("cpu")
                devices.free_cache(self.device)
                self._te_demoted = True
                return None
            self.te_placement = new
            self._te_promoted = True
            log.info("bonsai: %s", new.reason)
            return None
        self.te_placement = new
        self._te_demoted = True
        self._te_promoted = False
        self._move_text_encoder("cpu")
        devices.free_cache(self.device)
        return new.reason

    def _encode(self, prompt: str) -> torch.Tensor:
        from ..quant.layers import module_nbytes

        te = self.text_encoder
        moved = self.device.type != "cpu" and not self._te_offloaded and not self.te_resident
        if moved and not self._fits_on_device(module_nbytes(te)):
            # Too big for what the card has free: stream it layer by layer (accelerate's hooks move
            # each layer's weights to the device for its forward and back), slower but it fits.
            from accelerate import cpu_offload

            cpu_offload(te, execution_device=self.device)
            self._te_offloaded, moved = True, False
        parked = None
        if moved and self.device.type == "cuda" and isinstance(te, nn.Module):
            if self._te_parked is None:
                self._te_parked = HostParked(te)
            parked = self._te_parked
        try:
            if parked is not None:
                parked.lend(self.device)
            elif moved:
                te.to(self.device)
            # the decoder stack alone (no language-model head); streamed (accelerate hooks on the
            # top module) it runs whole, as the hooks expect
            stack = te if self._te_offloaded else getattr(te, "model", te)
            return _pipeline()._get_qwen3_prompt_embeds(
                ReadHiddenStates(stack, self.out_layers, self.folder), self._tokenizer, [prompt], dtype=self.dtype,
                device=self.device, max_sequence_length=self.max_sequence_length,
                hidden_states_layers=self.out_layers)
        finally:
            if parked is not None:
                parked.park()
            elif moved:
                te.to("cpu")
            if moved:
                devices.free_cache(self.device)

    # --- sampling -----------------------------------------------------------------------------
    def _latent_hw(self, width: int, height: int) -> tuple[int, int]:
        return height // self.latent_factor, width // self.latent_factor

    def schedule(self, steps, width, height, karras, sampler="euler", kind="auto"):
        if kind not in (None, "auto"):
            raise BonsaiRequestError(f"schedule {kind!r} is for the SD family; FLUX.2 [klein] has one flow "
                                     "schedule (use schedule auto)")
        if karras:
            raise BonsaiRequestError("Karras sigmas are for the SD family; FLUX.2 [klein] uses its flow schedule "
                                     "(turn karras off)")
        h, w = self._latent_hw(width, height)
        return sampling.flow_schedule(steps, image_seq_len=h * w, scheduler_config=self.scheduler_config)

    def latent_shape(self, width, height):
        h, w = self._latent_hw(width, height)
        # as Flux2KleinPipeline.prepare_latents: (in_channels // 4) latent channels x 4 patch positions
        return ((self.transformer.config.in_channels // 4) * 4, h, w)

    def denoiser(self, cond, uncond, guidance, schedule, width, height):
        pipe = _pipeline()
        use_cfg = uncond is not None and guidance != 1.0
        context = (torch.cat([uncond, cond]) if use_cfg else cond).to(self.device, self.dtype)
        txt_ids = pipe._prepare_text_ids(context).to(self.device)

        def denoise(x: torch.Tensor, i: int) -> torch.Tensor:
            b, _, h, w = x.shape
            img_ids = pipe._prepare_latent_ids(x).to(self.device)
            tokens = pipe._pack_latents(x.to(self.dtype))
            t = sampling.model_timestep(schedule, i).to(self.device, self.dtype).expand(b)
            if use_cfg:
                tokens, ids, t = torch.cat([tokens, tokens]), torch.cat([img_ids, img_ids]), torch.cat([t, t])
            else:
                ids = img_ids
            v = self._step(hidden_states=tokens, encoder_hidden_states=context, timestep=t, img_ids=ids,
                           txt_ids=txt_ids)
            v = v[:, : h * w].float()
            if use_cfg:
                v_u, v_c = v.chunk(2)
                v = v_u + guidance * (v_c - v_u)
            v = pipe._unpack_latents_with_ids(v, img_ids, h, w)
            return sampling.to_x0(schedule, x, v.to(x.dtype), i)

        return denoise

    def _forward(self, **inputs) -> torch.Tensor:
        return self.transformer(**inputs, guidance=None, return_dict=False)[0]

    def decode(self, latents, width, height):
        pipe = _pipeline()
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(
            latents.device, latents.dtype)
        z = pipe._unpatchify_latents(latents * std + mean)  # [B, 128, h, w] -> [B, 32, 2h, 2w]
        return self.vae_decode(z, width, height, retry_fp32=self.dtype == torch.float16)

    def release(self):
        super().release()
        self._te_parked = None
        self.text_encoder = self.transformer = self.vae = None
