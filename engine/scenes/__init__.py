"""Scenes: declared plugins that turn the newest source frame into an image.

``builtin_catalog()`` lists the scenes that ship with dreamdeck: two that run anywhere
(reaction-diffusion, passthrough), the real-time diffusion scene, and two slow generative
ones (DDPM, VQGAN+CLIP). A new scene is one more class added to the catalog.
"""

from __future__ import annotations

from engine.scenes.base import Scene, SceneCatalog, SceneNeeds
from engine.scenes.ddpm import DdpmScene
from engine.scenes.passthrough import Passthrough
from engine.scenes.reaction_diffusion import ReactionDiffusion
from engine.scenes.realtime import RealtimeScene
from engine.scenes.vqgan_clip import VqganClipScene
from engine.scenes.worker import SceneFrame, SceneWorker

__all__ = ["Scene", "SceneCatalog", "SceneNeeds", "SceneFrame", "SceneWorker", "builtin_catalog"]


def builtin_catalog() -> SceneCatalog:
    """In this order: F1-F5 and the 0-based index of ``scene/select`` follow it."""
    return SceneCatalog((ReactionDiffusion, Passthrough, RealtimeScene, DdpmScene, VqganClipScene))
