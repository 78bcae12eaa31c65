"""Errors that the diffusion code raises for the show to report (no torch needed here)."""

from __future__ import annotations


class ModelNotFound(LookupError):
    """A model (or LoRA, or TAESD) that cannot be had: the message names it and how to get it.

    The scene lets it propagate from ``load``, so the scene worker reports it in one line and
    keeps the previous scene playing.
    """

    def __init__(self, name: str, how_to_get: str) -> None:
        self.name = name
        self.how_to_get = how_to_get
        super().__init__(f"model {name!r} is not available: {how_to_get}")
