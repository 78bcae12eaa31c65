"""Per-stage timing of the hot path: CUDA events on a GPU, the host clock elsewhere.

CUDA work is asynchronous, so a host clock around a stage measures only its launch. Events
recorded on the stream measure the GPU's own time; they are read after the frame's
download has synchronised anyway, so timing adds no stall. On the CPU each stage runs
synchronously and the host clock is exact. (On MPS the host clock measures submission
for every stage but the download, which synchronises.)
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch

STAGES = ("upload", "encode", "unet", "decode", "download")


class StageTimer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.last: dict[str, float] = {}  # ms per stage of the last timed frame
        self.totals: dict[str, float] = {name: 0.0 for name in STAGES}
        self.frames = 0
        self._events: list[tuple[str, object, object]] = []
        self._host: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((name, start, end))
        else:
            started = time.perf_counter()
            yield
            self._host[name] = self._host.get(name, 0.0) + (time.perf_counter() - started) * 1000.0

    def finish(self) -> dict[str, float]:
        """Close the frame (call after the device has synchronised): ms per stage."""
        times = dict(self._host)
        for name, start, end in self._events:
            times[name] = times.get(name, 0.0) + start.elapsed_time(end)  # type: ignore[attr-defined]
        self._events.clear()
        self._host.clear()
        self.last = times
        for name, ms in times.items():
            self.totals[name] = self.totals.get(name, 0.0) + ms
        self.frames += 1
        return times

    def discard(self) -> None:
        """Drop a frame's records (one that produced no image)."""
        self._events.clear()
        self._host.clear()

    def reset(self) -> None:
        self.totals = {name: 0.0 for name in STAGES}
        self.frames = 0

    def means(self) -> dict[str, float]:
        return {name: (total / self.frames if self.frames else 0.0) for name, total in self.totals.items()}
