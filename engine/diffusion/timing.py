"""Per-stage timing of the hot path: off in a show, on in the benchmark (``StreamImg2Img(timing=True)``).

CUDA work is asynchronous, so a host clock around a stage measures only its launch. Events
recorded on the stream measure the GPU's own time. Reading an event the GPU has not reached
raises ("Both events must be completed"), so the timer never reads the frame it has just
closed: it reads frames one frame late, and only once every one of their events says it is
done (``query()``). Reading never waits, and timing never fails a frame: an error reading
events turns timing off, with one log line and ``error`` saying why.

Elsewhere the same logic runs on the host clock (``HostEvent``): on the CPU each stage runs
synchronously and the clock is exact. (On MPS it measures submission for every stage but
the download, which synchronises.)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol, cast

import torch

log = logging.getLogger(__name__)

STAGES = ("upload", "diffuse", "download")  # diffuse: encode, UNet and decode (one graph when compiled)
MAX_PENDING = 8  # closed frames kept unread at most (a frame whose events never complete is dropped)


class TimingEvent(Protocol):
    """What the timer needs of an event: ``torch.cuda.Event(enable_timing=True)`` has it."""

    def record(self) -> None: ...

    def query(self) -> bool: ...

    def elapsed_time(self, end: TimingEvent) -> float: ...


class HostEvent:
    """The host clock behind an event's interface (CPU work is synchronous: done when recorded)."""

    def __init__(self) -> None:
        self._at: float | None = None

    def record(self) -> None:
        self._at = time.perf_counter()

    def query(self) -> bool:
        return self._at is not None

    def elapsed_time(self, end: HostEvent) -> float:
        if self._at is None or end._at is None:
            raise RuntimeError("Both events must be recorded")
        return (end._at - self._at) * 1000.0


def cuda_timing_event() -> TimingEvent:
    # cast: torch types Event.elapsed_time as taking an Event (it is only ever given one)
    return cast(TimingEvent, torch.cuda.Event(enable_timing=True))


Frame = list[tuple[str, TimingEvent, TimingEvent]]


class StageTimer:
    """``with timer.stage("upload"): ...`` per stage, ``finish()`` after the frame's download.

    ``event_type``: makes the events (default: CUDA events on a CUDA device, the host clock
    elsewhere); tests give their own.
    """

    def __init__(
        self, device: torch.device, *, enabled: bool = False, event_type: Callable[[], TimingEvent] | None = None
    ) -> None:
        self.enabled = enabled
        self.error: str | None = None  # why timing turned itself off
        self.last: dict[str, float] = {}  # ms per stage of the last frame read
        self.totals: dict[str, float] = {name: 0.0 for name in STAGES}
        self.frames = 0  # frames read into the totals
        self.dropped = 0  # frames whose events never completed
        # cast: a HostEvent only ever meets HostEvents (one factory makes every event of a timer)
        host_event = cast("Callable[[], TimingEvent]", HostEvent)
        self._new_event = event_type or (cuda_timing_event if device.type == "cuda" else host_event)
        self._recording: Frame = []  # the frame in progress
        self._pending: list[Frame] = []  # closed frames not read yet, oldest first

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start, end = self._new_event(), self._new_event()
        start.record()
        yield
        end.record()
        self._recording.append((name, start, end))

    def finish(self) -> None:
        """Close the frame (a frame that produced an image), and read the frames before it that are done."""
        if not self.enabled:
            return
        if self._recording:
            self._pending.append(self._recording)
            self._recording = []
        if len(self._pending) > MAX_PENDING:
            del self._pending[0]
            self.dropped += 1
        self._read(keep_newest=True)

    def discard(self) -> None:
        """Drop the frame in progress (one that produced no image, or failed)."""
        self._recording = []

    def reset(self) -> None:
        self.totals = {name: 0.0 for name in STAGES}
        self.frames = 0
        self._pending.clear()
        self._recording = []

    def means(self) -> dict[str, float]:
        """ms per stage over the frames read (the newest too, when its events are done)."""
        self._read(keep_newest=False)
        return {name: (total / self.frames if self.frames else 0.0) for name, total in self.totals.items()}

    def _read(self, keep_newest: bool) -> None:
        try:
            while len(self._pending) > (1 if keep_newest else 0):
                frame = self._pending[0]
                if not all(start.query() and end.query() for _, start, end in frame):
                    return  # the GPU is not there yet: next time
                times: dict[str, float] = {}
                for name, start, end in frame:
                    times[name] = times.get(name, 0.0) + start.elapsed_time(end)
                del self._pending[0]
                self.last = times
                for name, ms in times.items():
                    self.totals[name] = self.totals.get(name, 0.0) + ms
                self.frames += 1
        except Exception as exc:  # the named fallback: no timing, never a failed frame (whatever an event raises)
            self.enabled = False
            self.error = f"stage timing off: {type(exc).__name__}: {exc}"
            self._pending.clear()
            log.warning("%s", self.error)
