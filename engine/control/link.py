"""Ableton Link: share tempo and beat phase with other apps on the local network.

aalink wraps the Link library for asyncio: a ``Link`` must be made inside a running event
loop, which calls its callbacks. So the session runs its own loop on its own thread, made
the first time Link is switched on (joining the session is a network act: nothing joins
until ``/link/enabled`` says so). Reading tempo and beat is a thread-safe snapshot of the
session in the Link library, so the render thread reads them directly and never waits.

Without aalink installed, ``status`` and ``error`` say so and ``state()`` is None.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Any

from engine.params import Param, ParamRegistry, bool_param

log = logging.getLogger(__name__)

LINK_PARAMS: tuple[Param, ...] = (
    bool_param(
        "/link/enabled",
        False,
        in_presets=False,
        description="Join the Ableton Link session on the local network (tempo and beat sharing)",
    ),
)


@dataclass(frozen=True)
class LinkState:
    """The session as read at one moment: ``beat`` on the shared timeline, ``phase`` in 0..quantum."""

    tempo: float
    beat: float
    phase: float
    peers: int


class LinkSession:
    """The Link Control. ``state()`` is what the tempo reads when its source is ``link``."""

    name = "link"

    def __init__(self, params: ParamRegistry, bpm: float = 120.0) -> None:
        self.params = params
        params.declare_all(LINK_PARAMS)
        self.error: str | None = None
        self._bpm = bpm
        self._quantum = 4.0
        self._wanted = False
        self._lock = threading.Lock()  # guards _loop and _link, published by the loop thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link: Any = None  # aalink.Link, made on the loop thread
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()

    # -- the Control protocol -------------------------------------------------------------
    @property
    def status(self) -> str:
        if self.error:
            return f"link unavailable: {self.error}"
        state = self.state()
        if state is None:
            return "link off" if not self._wanted else "link starting"
        peers = "1 peer" if state.peers == 1 else f"{state.peers} peers"
        return f"link on, {peers}, {state.tempo:.1f} BPM"

    def start(self) -> None:
        self.enable(bool(self.params.get("/link/enabled")))

    def stop(self) -> None:
        self._closing.set()  # before reading _loop: a thread still starting sees it when it publishes
        with self._lock:
            loop, thread = self._loop, self._thread
        if loop is not None:
            loop.call_soon_threadsafe(loop.stop)  # the thread leaves the session and closes the loop
        if thread is not None:
            thread.join(timeout=5.0)
        with self._lock:
            self._loop = self._link = self._thread = None
        self._wanted = False

    def frame(self, now: float) -> None:
        wanted = bool(self.params.get("/link/enabled"))
        if wanted != self._wanted:
            self.enable(wanted)

    # -- the session ---------------------------------------------------------------------------
    def enable(self, on: bool) -> None:
        """Join or leave the session; never waits (the loop thread does the work)."""
        self._wanted = on
        with self._lock:
            loop, thread = self._loop, self._thread
            if on and thread is None and self.error is None:
                self._closing.clear()
                self._thread = threading.Thread(target=self._run, name="link", daemon=True)
                self._thread.start()
                return
        if loop is not None:
            loop.call_soon_threadsafe(self._apply)

    def state(self) -> LinkState | None:
        """The session now, or None while Link is off (render thread; a thread-safe read)."""
        with self._lock:
            link = self._link
        if link is None or not self._wanted:
            return None
        return LinkState(
            tempo=float(link.tempo), beat=float(link.beat), phase=float(link.phase), peers=int(link.num_peers)
        )

    @property
    def quantum(self) -> float:
        return self._quantum

    @quantum.setter
    def quantum(self, beats: float) -> None:
        """Beats per bar: Link aligns the bar phase of all peers that use the same quantum."""
        self._quantum = float(beats)
        with self._lock:
            if self._link is not None:
                self._link.quantum = self._quantum

    def set_tempo(self, bpm: float) -> None:
        """Propose a tempo to the session (every peer follows the latest proposal)."""
        self._bpm = bpm
        with self._lock:
            if self._link is not None:
                self._link.tempo = bpm

    # -- the loop thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            import aalink  # lazily: only a show that switches Link on needs it
        except ImportError as exc:
            self.error = f"Ableton Link needs the aalink package ({exc})"
            log.error("%s", self.error)
            with self._lock:
                self._thread = None
            return
        loop = asyncio.new_event_loop()
        try:
            link = loop.run_until_complete(_make_link(aalink, self._bpm))
            link.quantum = self._quantum
            with self._lock:
                closing = self._closing.is_set()
                if not closing:
                    self._loop, self._link = loop, link
            if not closing:
                loop.call_soon(self._apply)  # the wish as of now, whatever changed while starting
                loop.run_forever()
            link.enabled = False
        finally:
            with self._lock:
                self._loop = self._link = None
            loop.close()
            log.info("link: left the session")

    def _apply(self) -> None:
        """Loop thread: make the session match the latest wish."""
        with self._lock:
            link = self._link
        if link is not None and bool(link.enabled) != self._wanted:
            link.enabled = self._wanted
            log.info("link: %s the session", "joined" if self._wanted else "left")


async def _make_link(aalink: Any, bpm: float) -> Any:
    """aalink binds a Link to the running loop it is made in (for its callbacks)."""
    return aalink.Link(bpm)
