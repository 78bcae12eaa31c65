"""Newest-value slots: how threads hand frames to each other without ever waiting.

A producer ``put``s; a consumer reads the newest value. A value that is replaced before
anyone read it is a dropped frame and is counted; nothing ever queues up behind a slow
consumer, so latency stays one frame.
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class NewestSlot(Generic[T]):
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._value: T | None = None
        self._seq = 0  # sequence number of the value held; 0 = nothing yet
        self._read = True  # has the held value been read by anyone?
        self.drops = 0
        self.puts = 0

    def put(self, value: T) -> None:
        """Replace the held value; never blocks."""
        with self._cond:
            if not self._read:
                self.drops += 1
            self._value = value
            self._seq += 1
            self.puts += 1
            self._read = False
            self._cond.notify_all()

    def latest(self) -> tuple[T | None, int]:
        """The newest value and its sequence number, without waiting (None, 0 if empty)."""
        with self._cond:
            self._read = True
            return self._value, self._seq

    def wait_newer(self, seq: int, timeout: float) -> tuple[T | None, int]:
        """Wait up to ``timeout`` s for a value newer than ``seq`` (worker threads only)."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq > seq, timeout)
            self._read = True
            return self._value, self._seq

    def clear(self) -> None:
        with self._cond:
            self._value = None
            self._read = True
