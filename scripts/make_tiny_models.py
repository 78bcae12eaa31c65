#!/usr/bin/env python3
"""Write tiny random-weight models that the ``realtime`` scene can load with no download.

    python3 scripts/make_tiny_models.py models/        # then /scene/realtime/model = models/tiny-turbo

Writes diffusers folders ``tiny-turbo`` (SD-turbo's trailing Euler) and ``tiny-lcm``
(LCM scheduler, with LCM_Dreamshaper's guidance embedding), ``tiny-taesd`` (an
AutoencoderTiny for /scene/realtime/vae) and ``tiny-turbo.safetensors`` (one original-layout
file; load it with the ``tiny-turbo`` folder as its config). The images are noise-coloured
blobs: these models check the plumbing, not the art. Sizes: 64x64 native, any multiple of 4.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write the models into")
    args = parser.parse_args(argv)

    import torch
    from diffusers import AutoencoderTiny

    from engine.diffusion.configs import TINY_TAESD, build_random_model
    from engine.diffusion.single_file import save_single_file

    args.out.mkdir(parents=True, exist_ok=True)
    turbo = build_random_model("tiny")
    turbo.save_pretrained(args.out / "tiny-turbo")
    save_single_file(turbo, args.out / "tiny-turbo.safetensors")
    build_random_model("tiny", scheduler="lcm", time_cond_proj_dim=32).save_pretrained(args.out / "tiny-lcm")
    torch.manual_seed(0)
    AutoencoderTiny(**TINY_TAESD).save_pretrained(args.out / "tiny-taesd")
    for path in sorted(args.out.iterdir()):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
