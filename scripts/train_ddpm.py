"""Train the texture DDPM shipped in engine/models/ddpm-textures (CPU, fixed seed).

    python3 scripts/train_ddpm.py                      # the shipped model (about 15 min on 2 idle cores)
    python3 scripts/train_ddpm.py --steps 200 --out /tmp/ddpm-pilot --docs /tmp   # a quick pilot

Writes the model folder (atomically), its training.json (config, wall time, every step's
loss) and docs/ddpm-loss.png + docs/ddpm-samples.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

# Before torch loads: idle OpenMP threads sleep instead of spinning. On a shared CPU, spinning
# threads fight the other processes and one training step took 10x longer (6.4 s vs 0.67 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from engine.ddpm.model import SHIPPED_MODEL
from engine.ddpm.train import TrainConfig, run

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for field in dataclasses.fields(TrainConfig):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=type(getattr(defaults, field.name)),
            default=getattr(defaults, field.name),
        )
    parser.add_argument("--out", type=Path, default=SHIPPED_MODEL, help="model folder to write")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs", help="where the two PNGs go")
    args = parser.parse_args()
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    report = run(config, args.out, args.docs)
    print(
        f"trained in {report['train_minutes']:.1f} min; mean loss of the last 200 steps "
        f"{report['final_loss_mean_last_200']:.4f}; model in {args.out}"
    )


if __name__ == "__main__":
    main()
