"""``--fallback-scene``: a local scene stands in while the source is lost.

The laptop whose source is a GPU box's NDI stream (``--source ndi:BOX``) shows the box's
diffused picture through the laptop's own effects; when the box goes away the source
falls back to the built-in pattern (``LiveInput``), and this control also switches the
show to a local scene that looks good without it. When the source is back, the scene
that was playing before comes back, unless the performer picked another meanwhile.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

SCENE_PARAM = "/scene/active"


class FallbackScene:
    """A Control: watches the input once a frame, switches ``/scene/active`` both ways."""

    name = "fallback scene"

    def __init__(self, app: Any, scene: str) -> None:
        self.app = app
        self.scene = scene
        self.standing_in = False
        self._before: str | None = None  # the scene the fallback replaced

    @property
    def status(self) -> str:
        return f"{self.scene} standing in for {self._before}" if self.standing_in else f"{self.scene} ready"

    def start(self) -> None:
        """Nothing to open."""

    def stop(self) -> None:
        """Nothing to close."""

    def frame(self, now: float) -> None:
        lost = bool(self.app.input.fallback_active)
        params = self.app.params
        if lost and not self.standing_in:
            self._before = str(params.target(SCENE_PARAM))
            self.standing_in = True
            if self._before != self.scene:
                log.warning("source lost: the local scene %s stands in for %s", self.scene, self._before)
                params.set(SCENE_PARAM, self.scene, origin="fallback")
        elif not lost and self.standing_in:
            self.standing_in = False
            if params.target(SCENE_PARAM) == self.scene and self._before not in (None, self.scene):
                log.info("source back: %s plays again", self._before)
                params.set(SCENE_PARAM, self._before, origin="fallback")
