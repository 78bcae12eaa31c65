"""Weighted prompts as performers type them: ``"a forest:1|fog:0.5"`` (no torch needed here).

The same syntax in every scene that takes text: ``|`` separates prompts, and a number after
the last ``:`` of a part is its weight (default 1). The realtime scene blends the prompts by
slerp; VQGAN+CLIP also takes negative weights (push the image away from a text).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MAX_PROMPTS = 16


@dataclass(frozen=True)
class WeightedPrompt:
    text: str
    weight: float  # negative: push the image away from it


def parse_prompts(text: str, negative: bool = False) -> list[WeightedPrompt]:
    """``"text[:weight]|text2[:weight]"`` -> prompts; ``negative`` makes every weight a push away.

    The weight is what follows the last ':' (default 1). Raises ValueError with the reason
    (a weight that is not a finite number, too many prompts); empty parts are skipped.
    """
    prompts = []
    for part in text.split("|"):
        body, weight = part.strip(), 1.0
        if ":" in body:
            body, _, number = body.rpartition(":")
            body = body.strip()
            try:
                weight = float(number)
            except ValueError:
                raise ValueError(
                    f"prompt weight {number.strip()!r} in {part.strip()!r} is not a number "
                    "(write text:weight, e.g. 'a forest:0.5')"
                ) from None
            if not math.isfinite(weight):
                raise ValueError(f"prompt weight {number.strip()!r} in {part.strip()!r} is not finite")
        if body and weight != 0.0:
            prompts.append(WeightedPrompt(body, -abs(weight) if negative else weight))
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"{len(prompts)} prompts: at most {MAX_PROMPTS}")
    return prompts
