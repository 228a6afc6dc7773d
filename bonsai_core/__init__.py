"""ComfyUI-Bonsai's engine: 1-bit (Q1_0) text-to-image diffusion on CUDA, MPS and CPU.

Imports no ComfyUI module, ever. Entry points: ``bonsai_core.engine.BonsaiImageEngine`` and the
``bonsai`` command (``bonsai_core.cli``).
"""

__version__ = "0.1.0"

from .errors import (  # noqa: F401  (the public error family)
    BonsaiCancelledError,
    BonsaiCheckpointError,
    BonsaiDeviceError,
    BonsaiError,
    BonsaiMemoryError,
    BonsaiRequestError,
)
