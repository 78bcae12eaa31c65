"""Scenes: declared plugins that turn the newest source frame into an image.

Every scene is found through the ``dreamdeck.scenes`` entry points (``engine.scenes.plugins``):
dreamdeck's own (reaction-diffusion and passthrough, which run anywhere, the real-time
diffusion scene, and the slow generative DDPM and VQGAN+CLIP) and those of any installed
package. A new scene is a ``Scene`` subclass and one entry point line; no core change.
"""

from __future__ import annotations

from engine.scenes.base import BackgroundLoad, LastGood, Scene, SceneCatalog, SceneNeeds
from engine.scenes.plugins import ENTRY_POINT_GROUP, ScenesNotFound, find_scenes, installed_catalog
from engine.scenes.worker import SceneFrame, SceneWorker

__all__ = [
    "BackgroundLoad",
    "ENTRY_POINT_GROUP",
    "LastGood",
    "Scene",
    "SceneCatalog",
    "SceneFrame",
    "SceneNeeds",
    "SceneWorker",
    "ScenesNotFound",
    "find_scenes",
    "installed_catalog",
]
