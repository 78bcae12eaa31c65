"""Named engine actions (next scene, recall preset, tap...) that any thread may post.

Controls run on their own threads; the engine's state belongs to the render thread. So a
control ``post``s an action and the render thread runs it at the next frame boundary,
in order. A handler that refuses its arguments raises ActionError: one log line and a
HUD error, and the show goes on.
"""

from __future__ import annotations

import inspect
import logging
import queue
from typing import Any, Callable, Protocol

log = logging.getLogger(__name__)

# The actions every view (keys, OSC, MIDI, web) can use; the app registers a handler for each.
ACTIONS = {
    "scene/next": "Switch to the next scene",
    "scene/select": "Switch to a scene by name or 0-based index",
    "scene/preload": "Load a scene in the background (name) so that cutting to it is instant",
    "preset/recall": "Recall a preset by name or 1-based number",
    "preset/save": "Save the current state as a preset (name)",
    "prompt": "Set the active scene's prompt (text)",
    "tap": "Tap tempo",
    "midi/learn": "Arm MIDI learn for a parameter path (the next control moved is mapped)",
}


class ActionError(ValueError):
    """An action whose arguments are wrong; the message says why."""


Handler = Callable[..., None]


class Control(Protocol):
    name: str
    status: str

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def frame(self, now: float) -> None: ...


class Actions:
    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._queue: queue.SimpleQueue[tuple[str, tuple[Any, ...], str]] = queue.SimpleQueue()
        self.last_error: str | None = None
        self.last_action: str | None = None

    def register(self, name: str, handler: Handler) -> None:
        if name not in ACTIONS:
            raise ValueError(f"unknown action {name!r}; add it to ACTIONS with a description")
        self._handlers[name] = handler

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def post(self, name: str, *args: Any, origin: str = "api") -> None:
        """Queue an action for the next frame boundary (any thread). Unknown names raise ActionError."""
        handler = self._handlers.get(name)
        if handler is None:
            raise ActionError(f"unknown action {name!r}")
        try:  # the wrong number of arguments is the sender's mistake, said now, not a crash later
            inspect.signature(handler).bind(*args)
        except TypeError as exc:
            raise ActionError(f"{name}: {exc}") from None
        self._queue.put((name, args, origin))

    def run_pending(self) -> int:
        """Render thread, frame boundary: run queued actions in order; returns how many ran."""
        count = 0
        while True:
            try:
                name, args, origin = self._queue.get_nowait()
            except queue.Empty:
                return count
            count += 1
            self.last_action = f"{name} {' '.join(map(str, args))} ({origin})".strip()
            try:
                self._handlers[name](*args)
            except ActionError as exc:
                self.last_error = f"{name}: {exc}"
                log.warning("action %s refused: %s", name, exc)
            except Exception as exc:  # a handler's bug must not end the show: loud, and the next frame comes
                self.last_error = f"{name} failed: {type(exc).__name__}: {exc}"
                log.exception("action %s failed", name)
