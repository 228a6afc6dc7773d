"""What a real ComfyUI needs to run the example workflows offline: the models they name, made tiny.

* ``models/bonsai/<SD_MODEL>``: a tiny SD-shaped pipeline converted to Bonsai (tests.sd_fixtures);
* ``models/bonsai/<KLEIN_MODEL>``: a tiny FLUX.2 [klein] pipeline converted to Bonsai, under the
  folder name the Bonsai Image 4B workflow uses (tests.klein_fixtures);
* ``models/upscale_models/<UPSCALER>``: a randomly initialised, small ESRGAN (RRDBNet, x4) state
  dict, a plain tensor dict in a .pth as the real file is (ComfyUI reads it with
  ``weights_only``), in the layout ComfyUI's upscaler loader (spandrel) recognises.
"""

from __future__ import annotations

from pathlib import Path

import torch

SD_MODEL = "bonsai-sd-tiny"
KLEIN_MODEL = "bonsai-image-binary-4B"
UPSCALER = "RealESRGAN_x4plus.pth"  # the name of the real file (xinntao/Real-ESRGAN releases)


def write_tiny_esrgan(path: Path, nf: int = 8, gc: int = 32, blocks: int = 1, seed: int = 0) -> Path:
    """RRDBNet x4 (ESRGAN / Real-ESRGAN's generator) with ``blocks`` RRDB blocks of three dense blocks,
    ``nf`` features, ``gc`` growth channels (spandrel reads ESRGAN files with 32). Weights are small noise around an identity-like
    colour path, so the output is a plausible 4x image, not saturated noise."""
    g = torch.Generator().manual_seed(seed)

    def conv(name: str, cout: int, cin: int, scale: float = 0.02):
        sd[f"{name}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * scale
        sd[f"{name}.bias"] = torch.zeros(cout)

    sd: dict[str, torch.Tensor] = {}
    conv("conv_first", nf, 3, 0.2)
    for b in range(blocks):
        for r in (1, 2, 3):
            for k in range(1, 5):
                conv(f"body.{b}.rdb{r}.conv{k}", gc, nf + (k - 1) * gc)
            conv(f"body.{b}.rdb{r}.conv5", nf, nf + 4 * gc)
    conv("conv_body", nf, nf)
    conv("conv_up1", nf, nf, 0.2)
    conv("conv_up2", nf, nf, 0.2)
    conv("conv_hr", nf, nf, 0.2)
    conv("conv_last", 3, nf, 0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def make_models(models: Path) -> Path:
    """Fill a ComfyUI ``models`` folder with everything the example workflows name."""
    from bonsai_core.convert import convert_pipeline
    from tests.klein_fixtures import make_full_pipeline
    from tests.sd_fixtures import make_tiny_sd_pipeline

    work = models.parent / "model-sources"
    if not (models / "bonsai" / SD_MODEL).exists():
        convert_pipeline(make_tiny_sd_pipeline(work / "sd"), models / "bonsai" / SD_MODEL, log=lambda m: None)
    if not (models / "bonsai" / KLEIN_MODEL).exists():
        convert_pipeline(make_full_pipeline(work / "klein"), models / "bonsai" / KLEIN_MODEL, log=lambda m: None)
    if not (models / "upscale_models" / UPSCALER).exists():
        write_tiny_esrgan(models / "upscale_models" / UPSCALER)
    return models
