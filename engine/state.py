"""The state that must survive a crash or a restart, kept in one small TOML file.

A gallery piece is restarted by systemd after a crash, a power cut or a reboot, and it
must come back as it was: the same preset, the same window on the same projector, the
same MIDI mappings and source. ``load_state()`` reads ``state.toml`` from the XDG state
folder (``$XDG_STATE_HOME/dreamdeck``, else ``~/.local/state/dreamdeck``); a
``StateStore`` writes it whenever something changes, debounced, on its own thread, so
the render thread never touches a file.

Every write is atomic (temp file in the same folder, fsync, rename, fsync the folder):
a crash mid-write leaves the previous state. A file that cannot be read (hand-edited
badly, truncated by a broken disk) is one log line: the show starts from the defaults and
the bad file is kept aside as ``state.toml.bad`` for someone to look at.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from engine.files import write_atomic
from engine.status import RenderedFrame

log = logging.getLogger(__name__)

STATE_FILE = "state.toml"
BAD_SUFFIX = ".bad"
DEBOUNCE_S = 1.0  # a fader dragged through presets writes once a second at most


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/dreamdeck``, else ``~/.local/state/dreamdeck`` (not created here)."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_STATE_HOME", "")
    # the XDG spec says a relative value is invalid and must be ignored
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".local" / "state"
    return root / "dreamdeck"


def state_path(environ: Mapping[str, str] | None = None) -> Path:
    return state_dir(environ) / STATE_FILE


@dataclass(frozen=True)
class SessionState:
    """What is restored after a restart. ``None`` means "not chosen: use the default"."""

    preset: str | None = None
    fullscreen: bool = False
    monitor: int = 0
    window_size: tuple[int, int] | None = None
    output_size: tuple[int, int] | None = None
    midi_mappings: str | None = None  # path of the MIDI mapping file last loaded or saved
    source: str | None = None  # the source spec last used, e.g. "camera:0"

    def to_toml(self) -> bytes:
        # TOML has no null: a field that is None is left out and reads back as None
        document = {
            f.name: list(v) if isinstance(v, tuple) else v
            for f in dataclasses.fields(self)
            if (v := getattr(self, f.name)) is not None
        }
        return tomli_w.dumps({"dreamdeck": document}).encode("utf-8")

    @classmethod
    def from_toml(cls, text: str) -> SessionState:
        """Parse and check a state file; raise ValueError saying what is wrong."""
        document = tomllib.loads(text)
        table = document.get("dreamdeck")
        if not isinstance(table, dict):
            raise ValueError("no [dreamdeck] table")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in table:
                values[f.name] = _check_field(f.name, table[f.name])
        unknown = sorted(set(table) - set(values))
        if unknown:  # written by a newer version: keep going without them
            log.debug("state file: ignoring unknown fields %s", ", ".join(unknown))
        return cls(**values)


_TEXT_FIELDS = ("preset", "midi_mappings", "source")
_SIZE_FIELDS = ("window_size", "output_size")


def _check_field(name: str, value: Any) -> Any:
    if name in _TEXT_FIELDS:
        if isinstance(value, str) and len(value) <= 4096:
            return value
        raise ValueError(f"{name}: expected text, got {value!r:.40}")
    if name == "fullscreen":
        if isinstance(value, bool):
            return value
        raise ValueError(f"fullscreen: expected true or false, got {value!r:.40}")
    if name == "monitor":
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 64:
            return value
        raise ValueError(f"monitor: expected a monitor index 0..63, got {value!r:.40}")
    if name in _SIZE_FIELDS:
        if (
            isinstance(value, list)
            and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and 16 <= v <= 16384 for v in value)
        ):
            return (value[0], value[1])
        raise ValueError(f"{name}: expected [width, height] in 16..16384, got {value!r:.40}")
    raise AssertionError(name)


# -- files -------------------------------------------------------------------------------


def load_state(path: Path | None = None) -> SessionState:
    """The saved state, or the defaults when there is none or it is unreadable.

    An unreadable file is moved to ``<name>.bad`` (replacing an older one) so the next
    save does not destroy the evidence and the next start does not trip on it again.
    Temp files left by a write that was killed midway are removed.
    """
    path = path or state_path()
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return SessionState()
    except OSError as exc:
        log.warning("state file %s cannot be read (%s): starting from the defaults", path, exc)
        return SessionState()
    try:
        return SessionState.from_toml(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, ValueError) as exc:
        bad = path.with_name(path.name + BAD_SUFFIX)
        try:
            os.replace(path, bad)
            kept = f"kept as {bad.name}"
        except OSError as move_error:
            kept = f"could not be moved aside: {move_error}"
        log.warning(
            "state file %s is corrupt (%s): starting from the defaults; the bad file %s",
            path,
            str(exc).splitlines()[0],
            kept,
        )
        return SessionState()


class StateStore:
    """Holds the current ``SessionState`` and writes it, debounced, on a writer thread.

    ``update`` may be called from any thread (the render thread included): it only swaps
    a value under a lock and wakes the writer. Changes that come within ``debounce_s`` of
    each other are written once; a value equal to what is on disk is not written again.
    """

    def __init__(
        self,
        path: Path | None = None,
        initial: SessionState | None = None,
        *,
        debounce_s: float = DEBOUNCE_S,
        writer: Callable[[Path, bytes], None] = write_atomic,
    ) -> None:
        self.path = path or state_path()
        self.debounce_s = debounce_s
        self.last_error: str | None = None
        self.writes = 0
        self._write = writer
        self._state = initial if initial is not None else SessionState()
        self._written: bytes | None = None
        self._dirty = False
        self._closing = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def state(self) -> SessionState:
        with self._cond:
            return self._state

    def start(self) -> StateStore:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="state writer", daemon=True)
            self._thread.start()
        return self

    def update(self, **changes: Any) -> None:
        """Change some fields (names as in SessionState); the write follows on the writer thread."""
        with self._cond:
            new = dataclasses.replace(self._state, **changes)
            if new != self._state:
                self._state = new
                self._dirty = True
                self._cond.notify_all()

    def flush(self) -> None:
        """Write now if anything changed (the caller's thread)."""
        with self._cond:
            if not self._dirty:
                return
            self._dirty = False
            data = self._state.to_toml()
        self._write_if_new(data)

    def close(self) -> None:
        """Stop the writer and write what is pending, so a clean exit loses nothing."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        self.flush()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._dirty or self._closing)
                if self._closing:
                    return
                # debounce: more changes arriving now are folded into this one write
                self._cond.wait_for(lambda: self._closing, timeout=self.debounce_s)
                if self._closing:
                    return  # close() flushes
                self._dirty = False
                data = self._state.to_toml()
            self._write_if_new(data)

    def _write_if_new(self, data: bytes) -> None:
        if data == self._written:
            return
        try:
            self._write(self.path, data)
        except OSError as exc:  # a full or read-only disk must not end the show: say so, keep playing
            self.last_error = f"state not saved to {self.path}: {exc}"
            log.error("%s", self.last_error)
            return
        self._written = data
        self.writes += 1
        self.last_error = None


class StateTracker:
    """An Output that notices, once per frame and without I/O, what changed in the show.

    It compares the frame's preset (and the window's fullscreen state, where there is a
    window) with what it saw last and hands changes to the store.
    """

    name = "state"

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._seen: dict[str, Any] = {}

    @property
    def status(self) -> str:
        return self.store.last_error or ""  # the HUD lists only parts with something to say

    def start(self) -> None:
        self.store.start()

    def stop(self) -> None:
        self.store.close()

    def after_render(self, frame: RenderedFrame) -> None:
        status = frame.status
        seen: dict[str, Any] = {"preset": status.preset}
        if status.fullscreen is not None:
            seen["fullscreen"] = status.fullscreen
        if seen != self._seen:
            changed = {k: v for k, v in seen.items() if self._seen.get(k, object()) != v}
            self._seen = seen
            if changed.get("preset", "") is None:
                del changed["preset"]  # "no preset yet" must not erase the one saved
            if changed:
                self.store.update(**changed)
