"""Entry points that must each be left out with one log line (see pyproject.toml)."""

from __future__ import annotations

from engine.scenes import Scene


class NotAScene:
    """Named like a scene, but not a Scene subclass."""

    name = "not_a_scene"


class Impostor(Scene):
    """Takes the name of one of dreamdeck's own scenes, which keep it."""

    name = "passthrough"

    def process(self, frame, t):
        raise AssertionError("an impostor must never play")
