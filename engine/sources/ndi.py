"""NDI in: any NDI sender on the network (OBS, TouchDesigner, Resolume, another dreamdeck).

``--source ndi:NAME`` finds the sender by its full NDI name ("HOST (NAME)"), its stream
name, or part of either (case does not matter), so ``ndi:laptop`` finds "STUDIO-PC (laptop)".
The receiver asks NDI for RGBA at the highest bandwidth and keeps only the newest frame.

When the sender goes away the NDI runtime does not say so: frames just stop. After the
watchdog's seconds without a frame the source checks whether the sender is still
announced; if not, it drops the connection and looks for it again with back-off, so a
sender that comes back under the same name is picked up by itself. cyndilib is imported
when the thread starts (the NDI extra); ``parse_source_spec`` refuses ``ndi:`` early
when it is not installed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from engine.sources.receiving import FrameRefused, ReceivingSource, packed_to_rgb

log = logging.getLogger(__name__)

RECEIVE_TIMEOUT_MS = 100  # one receive call waits at most this long, so stop() is prompt
FIND_WAIT = 1.0  # seconds the finder listens for announcements per search


def match_sender(names: list[str], wanted: str) -> str | None:
    """The announced NDI name ``wanted`` means: the full name, else the stream name (in
    brackets), else the first (sorted) name containing it, ignoring case."""
    low = wanted.lower()
    for name in names:
        if name.lower() == low:
            return name
    for name in names:
        stream = name[name.find("(") + 1 : name.rfind(")")] if "(" in name else name
        if stream.lower() == low:
            return name
    partial = sorted(name for name in names if low in name.lower())
    return partial[0] if partial else None


class NdiSource(ReceivingSource):
    """Frames from the NDI sender whose name matches ``sender`` (see ``match_sender``)."""

    kind = "ndi"

    def __init__(self, sender: str, *, backoff: tuple[float, float] = (0.5, 5.0), watchdog: float = 2.0) -> None:
        if not sender.strip():
            raise ValueError("an NDI source needs a sender name (or part of it)")
        super().__init__(f"ndi:{sender}", backoff=backoff, watchdog=watchdog)
        self.sender = sender.strip()
        self.connected_to: str | None = None  # the full NDI name of the sender being received

    def _run(self) -> None:
        try:
            import cyndilib as ndi
            from cyndilib.receiver import ReceiveFrameType
        except ImportError as exc:  # parse_source_spec checks first; this covers a direct construction
            self._wait_forever(f"cyndilib is not installed (pip install cyndilib): {exc}")
            return
        finder = ndi.Finder()
        finder.open()
        try:
            while not self._stop.is_set():
                self.status = "looking for the sender"
                name = self._find(finder)
                if name is None:
                    self._wait_to_retry(f"no NDI sender named like {self.sender!r}")
                    continue
                try:
                    failure = self._receive_from(ndi, ReceiveFrameType.recv_video, finder, name)
                except Exception as exc:  # the NDI runtime may raise anything: say it, look again, never die
                    log.exception("%s: receiving failed", self.name)
                    failure = f"{type(exc).__name__}: {exc}"
                if failure is not None:
                    self._wait_to_retry(failure)
        finally:
            finder.close()

    def _wait_forever(self, reason: str) -> None:
        log.error("%s: %s", self.name, reason)
        self.problem = reason
        self._stop.wait()

    def _find(self, finder: Any) -> str | None:
        finder.wait_for_sources(FIND_WAIT)
        finder.update_sources()
        return match_sender(finder.get_source_names(), self.sender)

    def _receive_from(self, ndi: Any, video: Any, finder: Any, name: str) -> str | None:
        """Receive until stopped or the sender is gone; the reason it is gone, or None."""
        receiver = ndi.Receiver(color_format=ndi.RecvColorFormat.RGBX_RGBA, bandwidth=ndi.RecvBandwidth.highest)
        frame = ndi.VideoRecvFrame()
        receiver.set_video_frame(frame)
        receiver.set_source(finder.get_source(name))
        if name != self.connected_to:
            log.info("%s: receiving from %r", self.name, name)
        self.connected_to = name
        self.status = f"connecting to {name!r}"
        buffer = np.empty(0, np.uint8)
        last = time.monotonic()
        try:
            while not self._stop.is_set():
                if receiver.receive(video, RECEIVE_TIMEOUT_MS) & video:
                    last = time.monotonic()
                    if frame.get_buffer_depth() > 1:  # newest only (skip_frames drops even a lone frame)
                        frame.skip_frames(True)
                    buffer = self._take(frame, buffer)
                elif time.monotonic() - last > self.watchdog:
                    finder.update_sources()
                    if match_sender(finder.get_source_names(), self.sender) != name:
                        return f"sender {name!r} is gone"
                    last = time.monotonic()  # still announced: wait on (it may be paused)
            return None
        finally:
            receiver.disconnect()

    def _take(self, frame: Any, buffer: np.ndarray) -> np.ndarray:
        """Copy the frame out, convert it and publish it; returns the buffer to reuse."""
        size = frame.get_buffer_size()
        if buffer.size != size:
            buffer = np.empty(size, np.uint8)  # a new resolution: a new buffer, no restart
        if not frame.fill_p_data(buffer):
            return buffer
        width, height = frame.get_resolution()
        fourcc = getattr(frame.get_fourcc(), "name", str(frame.get_fourcc()))
        try:
            rgb = packed_to_rgb(buffer, width, height, frame.get_line_stride(), fourcc)
        except FrameRefused as exc:
            self._refuse(str(exc))
            return buffer
        self._accept(rgb)
        return buffer
