"""Where a model comes from: a local folder or file, or a Hugging Face Hub repo id.

Repo ids are fetched with ``huggingface_hub.snapshot_download`` into the cache dir (default
``BONSAI_CACHE``). Offline mode (``HF_HUB_OFFLINE=1``) is honoured: a model that is not cached
is a clear ``BonsaiCheckpointError``, not a network timeout.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import BonsaiCheckpointError
from .shipped import SHIPPED_DIR, SHIPPED_NAME, shipped_model

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model(src: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                  revision: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """A local path for ``src``: the path itself if it exists, the packaged model for its name
    (``bonsai-shapes``), else a Hub snapshot."""
    path = Path(os.path.expanduser(str(src)))
    if path.exists():
        return path
    text = str(src)
    if text == SHIPPED_NAME:
        shipped = shipped_model()
        if shipped is None:
            raise BonsaiCheckpointError(
                f"model {text!r} is the project's shipped model, but this install carries none "
                f"(no {SHIPPED_DIR}/model_index.json); reinstall the package, or point --model at a model folder")
        return shipped
    if not _REPO_ID.match(text):
        raise BonsaiCheckpointError(
            f"model {text!r} is neither an existing file or folder nor a Hub repo id (owner/name); "
            "check the path")
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    cache = Path(cache_dir or os.environ.get("BONSAI_CACHE") or "./models/bonsai_cache")
    try:
        return Path(huggingface_hub.snapshot_download(
            repo_id=text, cache_dir=str(cache), revision=revision, allow_patterns=allow_patterns,
            local_files_only=is_offline()))
    except LocalEntryNotFoundError as exc:
        if is_offline():
            raise BonsaiCheckpointError(
                f"model {text!r} is not in the cache {cache} and offline mode is on (HF_HUB_OFFLINE); "
                "download it once with network access, or point --model at a local folder") from exc
        raise BonsaiCheckpointError(
            f"model {text!r} could not be downloaded and is not cached in {cache} ({exc}); "
            "check the network, or point --model at a local folder") from exc
    except RepositoryNotFoundError as exc:
        raise BonsaiCheckpointError(
            f"Hub repo {text!r} does not exist or is private (log in with `hf auth login`)") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:  # revision not found, network, disk full...
        raise BonsaiCheckpointError(
            f"model {text!r} could not be fetched into {cache} ({type(exc).__name__}: {exc}); check the name, "
            "the revision and the network, or point --model at a local folder") from exc


def find_models(folders: list[str | os.PathLike]) -> list[str]:
    """Model names under ``folders`` (ComfyUI's ``models/bonsai``, say), relative to their folder:
    every sub-folder holding a ``model_index.json`` (a Bonsai or diffusers model), and every
    ``.gguf`` / ``.safetensors`` file that lies outside such a folder (a payload to import). Sorted,
    duplicates once."""
    names: list[str] = []
    for root in folders:
        root = Path(root)
        if not root.is_dir():
            continue
        models = sorted(p.parent for p in root.rglob("model_index.json"))
        names += [m.relative_to(root).as_posix() for m in models if m != root]
        for f in sorted(root.rglob("*")):
            if f.suffix.lower() in (".gguf", ".safetensors") and f.is_file() \
                    and not any(m == f.parent or m in f.parents for m in models):
                names.append(f.relative_to(root).as_posix())
    return list(dict.fromkeys(names))
