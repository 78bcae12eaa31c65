"""Where frames go: a glfw window (projector, preview) or a headless EGL context.

Both give the compositor a moderngl context and the app a tiny event interface:
``poll()`` returns the key actions since the last frame, ``swap()`` presents.

A window may bring a second, preview window (``WindowConfig(preview=True)``): the
projector window shows the clean output, the preview shows it with the HUD on the
performer's laptop. The two GL contexts share objects, so the preview draws the very
output texture the compositor rendered, without a copy.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import moderngl

log = logging.getLogger(__name__)


class SurfaceError(RuntimeError):
    """No window or GL context could be made; the message says why and what to try."""


@dataclass(frozen=True)
class WindowConfig:
    size: tuple[int, int] = (1280, 720)
    fullscreen: bool = False
    monitor: int | str = 0  # index (0: primary), or part of the monitor's name ("HDMI", "DP-2")
    vsync: bool = True
    title: str = "dreamdeck"
    borderless: bool = False  # no title bar or frame when windowed (fullscreen never has them)
    preview: bool = False  # a second window with the output and the HUD, for the performer
    preview_size: tuple[int, int] = (640, 360)
    keep_awake: bool = True  # no screensaver or display sleep while the window is open


def pick_monitor(names: list[str], wanted: int | str) -> tuple[int, str | None]:
    """The index of the monitor asked for, and a warning when it falls back to monitor 0.

    ``wanted`` is an index, or text matched case-insensitively against the names glfw
    reports: a whole name first, then a name that starts with it, then one that contains
    it (so "DP" picks "DP-2" over "eDP-1", the laptop's own panel).
    """
    if not names:
        return 0, "no monitor found"
    listed = ", ".join(f"{i}: {n}" for i, n in enumerate(names))
    if isinstance(wanted, int):
        if 0 <= wanted < len(names):
            return wanted, None
        return 0, f"monitor {wanted} does not exist; using 0 (monitors: {listed})"
    text, lowered = wanted.lower(), [n.lower() for n in names]
    for matches in (str.__eq__, str.startswith, str.__contains__):
        for index, name in enumerate(lowered):
            if matches(name, text):
                return index, None
    return 0, f"no monitor named like {wanted!r}; using 0 (monitors: {listed})"


class HeadlessSurface:
    """An offscreen EGL context: for tests, servers and benchmarks (no window, no display)."""

    has_window = False

    def __init__(self) -> None:
        try:
            self.ctx = moderngl.create_context(standalone=True, backend="egl", require=330)
        except Exception as exc:  # glcontext raises plain Exceptions naming the missing library
            raise SurfaceError(
                f"no headless OpenGL context (EGL): {exc}. On Debian/Ubuntu: apt-get install libegl1 libgl1-mesa-dri"
            ) from exc
        self.size = (0, 0)
        self.should_close = False

    def poll(self) -> list[str]:
        return []

    def swap(self) -> None:
        """Nothing to show; make sure the frame's GL work is done, as a window swap would."""
        self.ctx.finish()

    def toggle_fullscreen(self) -> None:
        log.info("headless: no window to make fullscreen")

    def close(self) -> None:
        self.ctx.release()


# Keys the performer uses in the window, as actions the app understands.
def _key_actions(glfw) -> dict[int, str]:
    actions = {
        glfw.KEY_SPACE: "next_scene",
        glfw.KEY_F: "fullscreen",
        glfw.KEY_H: "hud",
        glfw.KEY_ESCAPE: "quit",
        glfw.KEY_L: "learn",
    }
    for n in range(1, 10):
        actions[getattr(glfw, f"KEY_{n}")] = f"preset:{n}"
        actions[getattr(glfw, f"KEY_F{n}")] = f"scene:{n - 1}"  # F1 = the first scene in `dreamdeck params`
    return actions


def _address(pointer: object) -> int | None:
    """A glfw handle's address: pyglfw returns NULL handles as pointer objects, not None,
    and two handles on one monitor are different Python objects."""
    return ctypes.cast(pointer, ctypes.c_void_p).value if pointer is not None else None


def _hint_gl33(glfw) -> None:
    glfw.window_hint(glfw.CONTEXT_VERSION_MAJOR, 3)
    glfw.window_hint(glfw.CONTEXT_VERSION_MINOR, 3)
    glfw.window_hint(glfw.OPENGL_PROFILE, glfw.OPENGL_CORE_PROFILE)
    glfw.window_hint(glfw.OPENGL_FORWARD_COMPAT, True)


class WindowSurface:
    """A glfw window with a GL 3.3 core context; fullscreen on a chosen monitor."""

    has_window = True

    def __init__(self, config: WindowConfig) -> None:
        import glfw  # imported here: glfw needs a display only when a window is asked for

        self.glfw = glfw
        self.config = config
        if not glfw.init():
            raise SurfaceError("cannot open a window: no display (set DISPLAY, or run with --headless)")
        glfw.default_window_hints()
        _hint_gl33(glfw)
        glfw.window_hint(glfw.AUTO_ICONIFY, False)  # a projector output must not minimise on focus loss
        glfw.window_hint(glfw.DECORATED, not config.borderless)
        self.window = glfw.create_window(config.size[0], config.size[1], config.title, None, None)
        if not self.window:
            glfw.terminate()
            raise SurfaceError("cannot create an OpenGL 3.3 window (is the GL driver installed?)")
        glfw.make_context_current(self.window)
        glfw.swap_interval(1 if config.vsync else 0)
        self.ctx = moderngl.create_context(require=330)
        self._actions = _key_actions(glfw)
        self._pending: list[str] = []
        self._windowed_rect = (100, 100, *config.size)
        glfw.set_key_callback(self.window, self._on_key)
        try:
            self.preview: PreviewWindow | None = PreviewWindow(self, config.preview_size) if config.preview else None
        except SurfaceError:
            self.ctx.release()
            glfw.destroy_window(self.window)
            glfw.terminate()
            raise
        if config.fullscreen:
            self.set_fullscreen(True)
        if self.preview is not None:
            self.preview.place_beside(self)
        self.keep_awake = KeepAwake(self._native_window_id()) if config.keep_awake else None

    def _on_key(self, window, key, scancode, action, mods) -> None:
        if action == self.glfw.PRESS and key in self._actions:
            self._pending.append(self._actions[key])

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.glfw.get_framebuffer_size(self.window))  # type: ignore[return-value]

    @property
    def should_close(self) -> bool:
        """The projector window, or the preview (the performer's window), was closed."""
        preview_closed = self.preview is not None and self.preview.should_close
        return bool(self.glfw.window_should_close(self.window)) or preview_closed

    def poll(self) -> list[str]:
        self.glfw.poll_events()
        actions, self._pending = self._pending, []
        return actions

    def swap(self) -> None:
        self.glfw.swap_buffers(self.window)

    def monitors(self) -> list[str]:
        names = []
        for monitor in self.glfw.get_monitors() or []:
            name = self.glfw.get_monitor_name(monitor)
            names.append(name.decode(errors="replace") if isinstance(name, bytes) else str(name))
        return names

    def set_fullscreen(self, on: bool) -> None:
        """Fullscreen at the monitor's current video mode: no mode switch, no border."""
        glfw = self.glfw
        if on:
            monitors = glfw.get_monitors() or []
            index, warning = pick_monitor(self.monitors(), self.config.monitor)
            if warning:
                log.warning("%s", warning)
            if not monitors:
                return
            x, y = glfw.get_window_pos(self.window)
            w, h = glfw.get_window_size(self.window)
            self._windowed_rect = (x, y, w, h)
            mode = glfw.get_video_mode(monitors[index])
            glfw.set_window_monitor(
                self.window, monitors[index], 0, 0, mode.size.width, mode.size.height, mode.refresh_rate
            )
            glfw.set_input_mode(self.window, glfw.CURSOR, glfw.CURSOR_HIDDEN)
            log.info(
                "fullscreen on monitor %d (%s), %dx%d", index, self.monitors()[index], mode.size.width, mode.size.height
            )
        else:
            x, y, w, h = self._windowed_rect
            glfw.set_window_monitor(self.window, None, x, y, w, h, 0)
            glfw.set_input_mode(self.window, glfw.CURSOR, glfw.CURSOR_NORMAL)

    @property
    def fullscreen(self) -> bool:
        return _address(self.glfw.get_window_monitor(self.window)) is not None

    def toggle_fullscreen(self) -> None:
        self.set_fullscreen(not self.fullscreen)

    def _native_window_id(self) -> int | None:
        """The X11 window id (what xdg-screensaver watches); None on other platforms."""
        if not (sys.platform.startswith("linux") and os.environ.get("DISPLAY")):
            return None
        try:
            window_id = self.glfw.get_x11_window(self.window)
        except (AttributeError, NotImplementedError, self.glfw.GLFWError):  # glfw without X11 (Wayland)
            return None
        return int(window_id) if window_id else None

    def close(self) -> None:
        if self.keep_awake is not None:
            self.keep_awake.release()
        if self.preview is not None:
            self.preview.close()
        self.ctx.release()
        self.glfw.destroy_window(self.window)
        self.glfw.terminate()


class PreviewWindow:
    """The performer's window: a second glfw window whose GL context shares the main one's
    textures. Draw into it inside ``with preview.current():`` (engine/render/output.py's
    ``PreviewView`` does); it never waits for vsync, so the projector keeps its frame rate.
    """

    def __init__(self, main: WindowSurface, size: tuple[int, int]) -> None:
        glfw = self.glfw = main.glfw
        self._main = main.window
        glfw.default_window_hints()
        _hint_gl33(glfw)
        self.window = glfw.create_window(size[0], size[1], f"{main.config.title} preview", None, main.window)
        if not self.window:
            raise SurfaceError("cannot create the preview window (a second, shared OpenGL 3.3 context)")
        glfw.set_key_callback(self.window, main._on_key)  # the performer's keys work here too
        glfw.make_context_current(self.window)
        glfw.swap_interval(0)
        self.ctx = moderngl.create_context(require=330)
        glfw.make_context_current(main.window)

    def place_beside(self, main: WindowSurface) -> None:
        """On another monitor than a fullscreen main window, else just right of the main window."""
        glfw = self.glfw
        if main.fullscreen:
            mine = _address(glfw.get_window_monitor(main.window))
            others = [m for m in glfw.get_monitors() or [] if _address(m) != mine]
            if others:
                x, y = glfw.get_monitor_pos(others[0])
                glfw.set_window_pos(self.window, x + 40, y + 40)
            return
        x, y = glfw.get_window_pos(main.window)
        left, _, right, _ = glfw.get_window_frame_size(main.window)
        width, _ = glfw.get_window_size(main.window)
        glfw.set_window_pos(self.window, x + width + right + left + 16, y)

    @contextmanager
    def current(self) -> Iterator[moderngl.Context]:
        """Make the preview's context current for the block, then the main one again.

        Switching contexts flushes the one left (GLX and EGL do), so the output texture
        the main context just rendered is complete when the preview samples it.
        """
        self.glfw.make_context_current(self.window)
        try:
            yield self.ctx
        finally:
            self.glfw.make_context_current(self._main)

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.glfw.get_framebuffer_size(self.window))  # type: ignore[return-value]

    @property
    def should_close(self) -> bool:
        return bool(self.glfw.window_should_close(self.window))

    def swap(self) -> None:
        self.glfw.swap_buffers(self.window)

    def close(self) -> None:
        with self.current():
            self.ctx.release()
        self.glfw.destroy_window(self.window)


class KeepAwake:
    """Keeps the display from blanking or sleeping while the show's window is open.

    Linux/X11: ``xdg-screensaver suspend <window>`` (it speaks to the desktop's screensaver,
    and resumes it by itself if we die), else ``xset s off -dpms``, restored on release.
    macOS: ``caffeinate -d -w <our pid>``. Windows: SetThreadExecutionState. Wayland: glfw
    already asks the compositor not to idle while a window is fullscreen. ``method`` says
    which was used, for the log and ``dreamdeck doctor``.
    """

    def __init__(self, x11_window: int | None) -> None:
        self.method = "none"
        self._x11_window = x11_window
        self._saved_xset: tuple[str, bool] | None = None  # (screensaver timeout and cycle, DPMS was on)
        self._caffeinate: subprocess.Popen | None = None
        try:
            self._inhibit()
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("could not keep the display awake (%s): set the machine's power settings instead", exc)
        else:
            log.info("keeping the display awake: %s", self.method)

    def _inhibit(self) -> None:
        if sys.platform == "darwin":
            self._caffeinate = subprocess.Popen(["caffeinate", "-d", "-w", str(os.getpid())])
            self.method = "caffeinate"
        elif sys.platform == "win32":
            import ctypes

            es_continuous, es_system, es_display = 0x80000000, 0x00000001, 0x00000002
            ctypes.windll.kernel32.SetThreadExecutionState(es_continuous | es_system | es_display)
            self.method = "SetThreadExecutionState"
        elif self._x11_window is not None:
            if shutil.which("xdg-screensaver"):
                _run(["xdg-screensaver", "suspend", hex(self._x11_window)])
                self.method = "xdg-screensaver"
            elif shutil.which("xset"):
                self._saved_xset = _xset_state()
                _run(["xset", "s", "off", *(["-dpms"] if self._saved_xset[1] else [])])
                self.method = "xset"
            else:
                log.warning(
                    "cannot keep the display awake: install xdg-utils or x11-xserver-utils "
                    "(xdg-screensaver, xset), or turn the screensaver off"
                )
        elif os.environ.get("WAYLAND_DISPLAY"):
            self.method = "wayland (glfw inhibits idle while fullscreen)"

    def release(self) -> None:
        try:
            if self.method == "xdg-screensaver" and self._x11_window is not None:
                _run(["xdg-screensaver", "resume", hex(self._x11_window)])
            elif self.method == "xset" and self._saved_xset is not None:
                saver, dpms = self._saved_xset
                _run(["xset", "s", *saver.split(), *(["+dpms"] if dpms else [])])
            elif self._caffeinate is not None:
                self._caffeinate.terminate()
                self._caffeinate.wait(5)
            elif self.method == "SetThreadExecutionState":
                import ctypes

                ctypes.windll.kernel32.SetThreadExecutionState(0x80000000)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("could not give the screensaver back (%s)", exc)
        self.method = "none"


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, timeout=10, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _xset_state() -> tuple[str, bool]:
    """The X screensaver's ``timeout cycle`` and whether DPMS is on, from ``xset q``
    (a server without the DPMS extension, such as Xvfb, reports neither on nor off)."""
    text = subprocess.run(["xset", "q"], check=True, timeout=10, capture_output=True, text=True).stdout
    m = re.search(r"timeout:\s*(\d+)\s+cycle:\s*(\d+)", text)
    return (f"{m[1]} {m[2]}" if m else "default"), "DPMS is Enabled" in text
