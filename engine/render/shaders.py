"""GLSL programs loaded from files under shaders/, with ``#include`` and hot reload.

A watcher thread notices edited files and reads them; the render thread compiles at the
frame boundary (GL calls belong to it). A program that fails to compile keeps its last
good version, and the compiler's message, pointed at the right file and line, is kept
in ``errors`` for the HUD.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import moderngl
import numpy as np

log = logging.getLogger(__name__)

VERTEX = "fullscreen.vert"
_INCLUDE = re.compile(r'^\s*#include\s+"([^"]+)"\s*$')
_MESA_LINE = re.compile(r"\b0:(\d+)\((\d+)\)")
MAX_INCLUDE_DEPTH = 8
Key = tuple[str, tuple[str, ...]]  # (fragment file, sorted defines)


class ShaderError(RuntimeError):
    """A shader that cannot be read or compiled; the message is the compiler's, shortened."""


def _first_error_line(message: str) -> str:
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower() and not ln.lower().startswith("glsl compiler failed"):
            return ln
    return lines[-1] if lines else "unknown compiler error"


@dataclass(frozen=True)
class Expanded:
    """A program's fragment source with includes pasted in, and where each line came from."""

    source: str
    origins: tuple[tuple[str, int], ...]  # line n (1-based) came from origins[n-1] = (file, line)

    @property
    def files(self) -> set[str]:
        return {f for f, _ in self.origins}

    def locate(self, message: str) -> str:
        """Rewrite the compiler's ``0:LINE(COL)`` into ``file:line``."""

        def repl(m: re.Match) -> str:
            n = int(m.group(1))
            if 1 <= n <= len(self.origins):
                f, line = self.origins[n - 1]
                return f"{f}:{line}"
            return m.group(0)

        return _MESA_LINE.sub(repl, message)


@dataclass
class _Entry:
    program: moderngl.Program
    vao: moderngl.VertexArray


class ShaderLibrary:
    """Fragment programs by file name (``"fx/kaleido.frag"``), each paired with the full-screen quad."""

    def __init__(self, ctx: moderngl.Context, root: Path, poll_interval: float = 0.25) -> None:
        self.ctx = ctx
        self.root = Path(root)
        self.errors: dict[str, str] = {}  # file name -> one-line compiler message
        self.last_error: str | None = None
        self.reloads = 0
        self._entries: dict[Key, _Entry] = {}
        self._vertex_source = self._read(VERTEX)
        self._changed: queue.SimpleQueue[tuple[Key, Expanded | ShaderError]] = queue.SimpleQueue()
        self._mtimes: dict[str, int] = {}  # every file a program uses -> last seen mtime
        self._users: dict[Key, set[str]] = {}  # program -> the files it is made of
        self._failing: set[Key] = set()  # programs whose latest edit did not compile
        self.compile_ms: dict[Key, float] = {}
        self._failed: dict[Key, ShaderError] = {}  # variants that failed, until a file changes
        self._poll_interval = poll_interval
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        quad = np.array([-1, -1, 1, -1, -1, 1, -1, 1, 1, -1, 1, 1], dtype="f4")
        self._quad = ctx.buffer(quad.tobytes())

    # -- loading -------------------------------------------------------------------
    def _read(self, name: str) -> str:
        path = self.root / name
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ShaderError(f"{name}: cannot read ({exc.strerror})") from exc

    def expand(self, name: str, depth: int = 0) -> Expanded:
        """Paste ``#include "file"`` lines in (paths relative to the shader folder)."""
        if depth > MAX_INCLUDE_DEPTH:
            raise ShaderError(f"{name}: includes nested deeper than {MAX_INCLUDE_DEPTH}")
        lines: list[str] = []
        origins: list[tuple[str, int]] = []
        for number, line in enumerate(self._read(name).splitlines(), 1):
            m = _INCLUDE.match(line)
            if m:
                inner = self.expand(m.group(1), depth + 1)
                lines.extend(inner.source.splitlines())
                origins.extend(inner.origins)
            else:
                lines.append(line)
                origins.append((name, number))
        return Expanded("\n".join(lines) + "\n", tuple(origins))

    def _compile(self, name: str, expanded: Expanded) -> tuple[moderngl.Program, moderngl.VertexArray]:
        try:
            program = self.ctx.program(vertex_shader=self._vertex_source, fragment_shader=expanded.source)
        except moderngl.Error as exc:
            raise ShaderError(expanded.locate(_first_error_line(str(exc)))) from exc
        vao = self.ctx.vertex_array(program, [(self._quad, "2f", "in_pos")])
        return program, vao

    def expand_variant(self, key: Key) -> Expanded:
        """``expand`` plus ``#define NAME 1`` for each of the key's defines, after ``#version``."""
        name, defines = key
        base = self.expand(name)
        lines = base.source.splitlines()
        if not lines or not lines[0].startswith("#version"):
            raise ShaderError(f"{name}:1: the first line must be #version")
        extra = [f"#define {d} 1" for d in defines]
        source = "\n".join([lines[0], *extra, *lines[1:]]) + "\n"
        origins = (base.origins[0], *[("(define)", 0)] * len(extra), *base.origins[1:])
        return Expanded(source, origins)

    def get(self, name: str, defines: tuple[str, ...] = ()) -> tuple[moderngl.Program, moderngl.VertexArray]:
        """The program for a fragment file (and a set of defines), compiled on first use.

        Raises ShaderError when it does not compile and there is no earlier good version.
        """
        key = (name, tuple(sorted(defines)))
        entry = self._entries.get(key)
        if entry is None:
            failure = self._failed.get(key)
            if failure is not None:  # no new read or compile until a file changes
                raise failure
            try:
                expanded = self.expand_variant(key)
                self._watch_files(key, expanded.files)
                started = time.perf_counter()
                program, vao = self._compile(name, expanded)
            except ShaderError as exc:
                self._failed[key] = exc
                raise
            entry = self._entries[key] = _Entry(program, vao)
            self.compile_ms[key] = (time.perf_counter() - started) * 1000
            log.debug("compiled %s %s in %.0f ms", name, "+".join(key[1]) or "-", self.compile_ms[key])
        return entry.program, entry.vao

    def has(self, name: str, defines: tuple[str, ...] = ()) -> bool:
        return (name, tuple(sorted(defines))) in self._entries

    def _watch_files(self, program: Key, files: set[str]) -> None:
        self._users.setdefault(program, set()).update(files)
        for f in files:
            if f not in self._mtimes:
                try:
                    self._mtimes[f] = (self.root / f).stat().st_mtime_ns
                except OSError:
                    self._mtimes[f] = 0

    # -- hot reload ----------------------------------------------------------------
    def start_watching(self) -> None:
        self._watcher = threading.Thread(target=self._watch, name="shader watcher", daemon=True)
        self._watcher.start()

    def stop_watching(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(2.0)

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_interval):
            self.check_files()

    def check_files(self) -> int:
        """Re-read every program made of a file whose mtime changed (watcher thread or tests)."""
        changed = set()
        for name, seen in list(self._mtimes.items()):
            try:
                mtime = (self.root / name).stat().st_mtime_ns
            except OSError:
                continue  # mid-save editors delete and recreate; try again next poll
            if mtime != seen:
                self._mtimes[name] = mtime
                changed.add(name)
        if changed:
            self._failed.clear()
        programs = [p for p, files in list(self._users.items()) if files & changed]
        for program in programs:
            try:
                expanded = self.expand_variant(program)
                self._watch_files(program, expanded.files)
                self._changed.put((program, expanded))
            except ShaderError as exc:
                self._changed.put((program, exc))
        return len(programs)

    def poll(self) -> list[str]:
        """Render thread, frame boundary: recompile edited programs; returns the names reloaded."""
        reloaded = []
        while True:
            try:
                key, expanded = self._changed.get_nowait()
            except queue.Empty:
                return reloaded
            name = key[0]
            try:
                if isinstance(expanded, ShaderError):
                    raise expanded
                program, vao = self._compile(name, expanded)
            except ShaderError as exc:
                self._failing.add(key)
                self.errors[name] = str(exc)
                self.last_error = str(exc)
                log.error("shader %s failed, keeping the last good version: %s", name, exc)
                continue
            old = self._entries.get(key)
            if old is not None:
                old.vao.release()
                old.program.release()
            self._entries[key] = _Entry(program, vao)
            self._failing.discard(key)
            if not any(failing[0] == name for failing in self._failing):  # another variant may still be broken
                self.errors.pop(name, None)
            self.reloads += 1
            reloaded.append(name)
            log.info("shader %s reloaded", name)

    def release(self) -> None:
        self.stop_watching()
        for entry in self._entries.values():
            entry.vao.release()
            entry.program.release()
        self._entries.clear()
        self._quad.release()


def set_uniform(program: moderngl.Program, name: str, value: object) -> None:
    """Set a uniform if the compiled program still has it (GLSL drops unused ones)."""
    member = program.get(name, None)
    if member is not None:
        member.value = value
