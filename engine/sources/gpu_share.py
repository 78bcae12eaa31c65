"""Spout in (Windows) and Syphon in (macOS): another app's texture as the show's source.

Both are built like the NDI source (``ReceivingSource``): their own thread, the newest
frame only, the watchdog, back-off while the sender is missing, a new size taken as it
comes. They read the texture back to host memory (the show's sources are host frames);
at 1280x720 that is a few milliseconds on the source thread, off the render thread.
On another platform ``parse_source_spec`` refuses them with one line, before the show.

These two run only on their own platform, so the test suite here checks the refusal;
the receive loops follow the packages' documented examples (SpoutGL, syphon-python).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import numpy as np

from engine.sources.receiving import FrameRefused, ReceivingSource, check_size, packed_to_rgb

log = logging.getLogger(__name__)

POLL = 1 / 120  # seconds between looks for a new frame: well under a 60 fps frame period
PLATFORMS = {"spout": ("win32", "Windows", "SpoutGL"), "syphon": ("darwin", "macOS", "syphon-python")}


def platform_refusal(kind: str, platform: str = sys.platform) -> str | None:
    """Why ``kind`` (spout or syphon) cannot run here, in one line; None where it can."""
    prefix, system, package = PLATFORMS[kind]
    if platform.startswith(prefix):
        return None
    return f"{kind}: sources run on {system} only ({package}); across machines or on this system use ndi:NAME"


class SpoutSource(ReceivingSource):
    """Frames from the Spout sender ``sender`` ("" = the active sender)."""

    kind = "spout"

    def __init__(self, sender: str, **kwargs: Any) -> None:
        super().__init__(f"spout:{sender}", **kwargs)
        self.sender = sender

    def _run(self) -> None:
        try:
            import moderngl
            import SpoutGL
            from OpenGL import GL
        except ImportError as exc:
            self.problem = f"Spout needs SpoutGL and PyOpenGL (pip install SpoutGL PyOpenGL): {exc}"
            log.error("%s: %s", self.name, self.problem)
            return
        ctx = moderngl.create_standalone_context()  # Spout copies into a texture of a GL context current here
        try:
            with SpoutGL.SpoutReceiver() as receiver:
                receiver.setReceiverName(self.sender)
                self._pump(receiver, GL.GL_RGBA)
        finally:
            ctx.release()

    def _pump(self, receiver: Any, gl_rgba: int) -> None:
        buffer: np.ndarray | None = None
        last = time.monotonic()
        while not self._stop.wait(POLL):
            received = receiver.receiveImage(buffer, gl_rgba, False, 0)
            if receiver.isUpdated():  # first frame, or the sender changed size: a new buffer
                width, height = receiver.getSenderWidth(), receiver.getSenderHeight()
                try:
                    check_size(width, height)
                except FrameRefused as exc:
                    self._refuse(str(exc))
                    buffer = None
                    continue
                buffer = np.zeros(width * height * 4, np.uint8)
                continue
            if received and buffer is not None and receiver.isFrameNew():
                last = time.monotonic()
                width, height = receiver.getSenderWidth(), receiver.getSenderHeight()
                self._accept(packed_to_rgb(buffer, width, height, width * 4, "RGBA"))
            elif time.monotonic() - last > self.watchdog:
                self.problem = f"no Spout sender {self.sender!r}" if self.sender else "no Spout sender"
                self.retry_at = 0.0


class SyphonSource(ReceivingSource):
    """Frames from the Syphon server whose name (or app name) contains ``server``."""

    kind = "syphon"

    def __init__(self, server: str, **kwargs: Any) -> None:
        super().__init__(f"syphon:{server}", **kwargs)
        self.server = server

    def _run(self) -> None:
        try:
            from syphon import SyphonMetalClient
            from syphon.server_directory import SyphonServerDirectory
            from syphon.utils.numpy import copy_mtl_texture_to_image
        except ImportError as exc:
            self.problem = f"Syphon needs syphon-python (pip install syphon-python): {exc}"
            log.error("%s: %s", self.name, self.problem)
            return
        directory = SyphonServerDirectory()
        while not self._stop.is_set():
            matches = [
                s
                for s in directory.servers
                if self.server.lower() in f"{s.app_name} {s.name}".lower()  # app name or server name
            ]
            if not matches:
                self._wait_to_retry(f"no Syphon server named like {self.server!r}")
                continue
            client = SyphonMetalClient(matches[0])
            try:
                failure = self._pump(client, copy_mtl_texture_to_image)
            finally:
                client.stop()
            if failure is not None:
                self._wait_to_retry(failure)

    def _pump(self, client: Any, copy: Any) -> str | None:
        last = time.monotonic()
        while not self._stop.wait(POLL):
            if client.has_new_frame:
                last = time.monotonic()
                bgra = np.asarray(copy(client.new_frame_image))
                height, width = bgra.shape[:2]
                try:
                    self._accept(packed_to_rgb(bgra.reshape(-1), width, height, width * 4, "BGRA"))
                except FrameRefused as exc:
                    self._refuse(str(exc))
            elif not client.is_valid or time.monotonic() - last > self.watchdog:
                return "the Syphon server is gone"
        return None
