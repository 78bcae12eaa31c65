"""Reading the output texture back to host memory without making the render thread wait.

``glReadPixels`` into host memory waits until the GPU has finished the frame. Reading into
a GL pixel buffer instead only queues a copy; the pixels are fetched from it one frame
later, when the copy has long finished. Host buffers come from a fixed pool that the
consumer thread hands back: when every buffer is still in use downstream, the frame is
dropped (and counted) rather than allocating or waiting. The pool is what bounds the
memory an output can hold: ``buffers`` frames, never more.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Any

import moderngl


@dataclass
class Pixels:
    """One frame read back: RGBA rows, top row first (the engine's texture convention)."""

    data: bytearray
    size: tuple[int, int]
    tag: Any  # what the caller said about the frame when it asked for it (a time, a slot...)


class Readback:
    """Asynchronous readback of RGBA textures of one size, one frame late (render thread only)."""

    def __init__(self, ctx: moderngl.Context, size: tuple[int, int], buffers: int) -> None:
        if buffers < 1:
            raise ValueError("a readback needs at least one host buffer")
        self.size = size
        self.frame_bytes = size[0] * size[1] * 4
        self.dropped = 0
        self._pbo = ctx.buffer(reserve=self.frame_bytes)
        self._pending: Any = None
        self._has_pending = False
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(buffers):
            self._free.put(bytearray(self.frame_bytes))

    def request(self, texture: moderngl.Texture, tag: Any) -> Pixels | None:
        """Queue a copy of ``texture``; returns the previous request's pixels, if any were kept."""
        if texture.size != self.size or texture.components != 4:
            raise ValueError(
                f"readback of {self.size} RGBA got a {texture.size} texture of {texture.components} components"
            )
        previous = self.collect()
        texture.read_into(self._pbo, alignment=1)
        self._pending, self._has_pending = tag, True
        return previous

    def collect(self) -> Pixels | None:
        """The pending request's pixels; None when nothing is pending or no host buffer is free."""
        if not self._has_pending:
            return None
        self._has_pending = False
        try:
            data = self._free.get_nowait()
        except queue.Empty:
            self.dropped += 1
            return None
        self._pbo.read_into(data)
        return Pixels(data, self.size, self._pending)

    def give_back(self, pixels: Pixels) -> None:
        """Return a frame's buffer to the pool (any thread) once it has been consumed."""
        self._free.put(pixels.data)

    def release(self) -> None:
        self._pbo.release()
