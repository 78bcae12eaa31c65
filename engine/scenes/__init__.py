"""Scenes: declared plugins that turn the newest source frame into an image.

``builtin_catalog()`` lists the scenes that ship with dreamdeck. A later scene (the
diffusion ones) is one more class added to the catalog; nothing else changes.
"""

from __future__ import annotations

from engine.scenes.base import Scene, SceneCatalog, SceneNeeds
from engine.scenes.passthrough import Passthrough
from engine.scenes.reaction_diffusion import ReactionDiffusion
from engine.scenes.realtime import RealtimeScene
from engine.scenes.worker import SceneFrame, SceneWorker

__all__ = ["Scene", "SceneCatalog", "SceneNeeds", "SceneFrame", "SceneWorker", "builtin_catalog"]


def builtin_catalog() -> SceneCatalog:
    return SceneCatalog((ReactionDiffusion, Passthrough, RealtimeScene))
