"""Where the project's own model lives once it ships inside the package (issue 19).

``bonsai-shapes``: a 1-bit (Q1_0) SD-layout model distilled from a full-precision teacher trained
on the scene renderer (``scenes.py``; training code in the repository's ``training/`` folder, model
card in the folder itself). It is the default model (``config.SHIPPED_MODEL``, by this name, which
``hub.resolve_model`` maps to the folder); ``shipped_model()`` is None only in an install without it.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_NAME = "bonsai-shapes"
SHIPPED_DIR = Path(__file__).resolve().parent / "assets" / SHIPPED_NAME


def shipped_model() -> Path | None:
    """The packaged model folder, or None when this install carries none."""
    return SHIPPED_DIR if (SHIPPED_DIR / "model_index.json").is_file() else None
