"""Where the project's own model lives once it ships inside the package (issue 19).

``bonsai-shapes``: a 1-bit (Q1_0) SD-layout model distilled from a full-precision teacher trained
on the scene renderer (``scenes.py``; training code in the repository's ``training/`` folder, model
card in the folder itself). Until the trained folder is committed, ``shipped_model()`` is None.
"""

from __future__ import annotations

from pathlib import Path

SHIPPED_NAME = "bonsai-shapes"
SHIPPED_DIR = Path(__file__).resolve().parent / "assets" / SHIPPED_NAME


def shipped_model() -> Path | None:
    """The packaged model folder, or None when this install carries none."""
    return SHIPPED_DIR if (SHIPPED_DIR / "model_index.json").is_file() else None
