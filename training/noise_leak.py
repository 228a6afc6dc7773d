"""How much of an object's place survives in the noised latent, read without any model (issue 19).

    python training/noise_leak.py --vae TEACHER/vae [--scenes 192] [--pyramid 0.6]

One-object scenes are encoded by the teacher's VAE and noised on SD's schedule at a late step t;
a matched-filter guess (the 3x3 cell whose mean latent departs most from the image mean) reads the
object's cell from ``x_t`` alone. At t = 999 the plain noise leaves enough to read it far above
chance, so a model trained on it learns to place objects where the starting noise says; pyramid
noise (``train_teacher.pyramid_noise``) brings it to chance.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bonsai_core import scenes as S  # noqa: E402
from training import train_teacher as T  # noqa: E402


def guess_cells(zt: torch.Tensor) -> torch.Tensor:
    centred = zt - zt.mean(dim=(2, 3), keepdim=True)
    return F.adaptive_avg_pool2d(centred, 3).abs().sum(1).flatten(1).argmax(1)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vae", required=True, help="the teacher's vae/ folder")
    p.add_argument("--scenes", type=int, default=192)
    p.add_argument("--pyramid", type=float, default=0.6)
    p.add_argument("--steps", type=int, nargs="+", default=[999, 950, 900, 800])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.vae).float().eval()
    sc = S.scenes(7, args.scenes, "any", start=0, two_objects=0.0)
    x = S.render_batch(sc, 512, "cpu") * 2 - 1
    with torch.no_grad():
        z = torch.cat([vae.encode(x[i:i + 16]).latent_dist.mean for i in range(0, len(x), 16)])
    z = z * vae.config.scaling_factor
    cells = torch.tensor([list(S.POSITIONS).index(s.objects[0].position) for s in sc])
    alphas = T._sd_alphas("cpu")
    gen = torch.Generator().manual_seed(1)
    print(f"cell read from clean latents: {(guess_cells(z) == cells).float().mean().item():.0%}; chance 11 %")
    for t in args.steps:
        row = []
        for disc in (0.0, args.pyramid):
            hits = []
            for _ in range(args.repeats):
                n = torch.randn(z.shape, generator=gen)
                n = T.pyramid_noise(n, gen, disc)
                zt = alphas[t].sqrt() * z + (1 - alphas[t]).sqrt() * n
                hits.append((guess_cells(zt) == cells).float().mean().item())
            row.append(sum(hits) / len(hits))
        print(f"t={t}: read from x_t with plain noise {row[0]:.0%}, with pyramid noise {args.pyramid} {row[1]:.0%}")


if __name__ == "__main__":
    main()
