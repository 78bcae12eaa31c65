"""A browser's camera as the show's source, over WebRTC (aiortc).

The status page serves ``/camera`` (engine/web/static/camera.html): the phone or laptop
opens it, the browser sends its camera as a WebRTC offer to ``POST /api/webrtc/offer``
(the status page's token and allowlist apply), and this source answers it. One browser
at a time: a new offer replaces the one before (the phone that reloaded the page).

aiortc is asyncio, so the source's thread runs an event loop; the HTTP thread hands it
the offer and waits for the answer. Frames are decoded there, converted to RGB and put
in the slot; the newest only. A malformed offer is refused (400) with one line, the
browser that goes away is the usual "lost", and the fallback pattern plays meanwhile.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Any

from engine.sources.receiving import FrameRefused, ReceivingSource, check_size

log = logging.getLogger(__name__)

ANSWER_TIMEOUT = 10.0  # seconds an offer may take to answer (ICE gathering on loopback is well under one)


class OfferRefused(ValueError):
    """An offer this source cannot answer; the message is one line for the browser and the log."""


class WebRtcSource(ReceivingSource):
    """Frames from the browser that last sent an offer."""

    kind = "webrtc"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("webrtc", **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._peer: Any = None
        self.peers = 0  # offers answered so far

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self.status = "waiting for a browser (open /camera on the status page)"
        try:
            loop.run_until_complete(self._until_stopped())
        finally:
            loop.run_until_complete(self._close_peer())
            loop.close()
            self._loop = None

    async def _until_stopped(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(0.1)

    # -- the offer (called on an HTTP thread) ---------------------------------------------------
    def answer(self, offer: Any) -> dict[str, str]:
        """The SDP answer to a browser's ``{"sdp": ..., "type": "offer"}``; raises OfferRefused."""
        if not isinstance(offer, dict) or offer.get("type") != "offer" or not isinstance(offer.get("sdp"), str):
            raise OfferRefused('expected {"type": "offer", "sdp": "v=0..."}')
        loop = self._loop
        if loop is None:
            raise OfferRefused("the webrtc source is not running")
        future = asyncio.run_coroutine_threadsafe(self._answer(offer["sdp"]), loop)
        try:
            return future.result(ANSWER_TIMEOUT)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise OfferRefused(f"no answer within {ANSWER_TIMEOUT:.0f} s") from None
        except OfferRefused:
            raise
        except Exception as exc:  # aiortc's parser raises many kinds on a malformed SDP
            raise OfferRefused(f"malformed offer: {type(exc).__name__}: {str(exc)[:200]}") from None

    async def _answer(self, sdp: str) -> dict[str, str]:
        from aiortc import RTCPeerConnection, RTCSessionDescription

        await self._close_peer()  # one browser at a time: the newest
        peer = RTCPeerConnection()
        self._peer = peer

        @peer.on("track")
        def on_track(track: Any) -> None:
            if track.kind == "video":
                asyncio.ensure_future(self._pump(track))

        try:
            await peer.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            if not any(t.kind == "video" for t in peer.getTransceivers()):
                raise OfferRefused("the offer has no video (is the camera allowed?)")
            await peer.setLocalDescription(await peer.createAnswer())
        except BaseException:
            await self._close_peer()
            raise
        self.peers += 1
        self.status = "browser connecting"
        log.info("webrtc: a browser offered its camera (peer %d)", self.peers)
        return {"sdp": peer.localDescription.sdp, "type": peer.localDescription.type}

    async def _pump(self, track: Any) -> None:
        from aiortc.mediastreams import MediaStreamError

        while not self._stop.is_set():
            try:
                frame = await track.recv()
            except MediaStreamError:
                self.problem = "the browser stopped sending"
                log.warning("webrtc: the browser stopped sending (the show plays on)")
                return
            try:
                check_size(frame.width, frame.height)
                self._accept(frame.to_ndarray(format="rgb24"))
            except FrameRefused as exc:
                self._refuse(str(exc))

    async def _close_peer(self) -> None:
        peer, self._peer = self._peer, None
        if peer is not None:
            await peer.close()
