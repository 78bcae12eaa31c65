"""Where frames go: a glfw window (projector, preview) or a headless EGL context.

Both give the compositor a moderngl context and the app a tiny event interface:
``poll()`` returns the key actions since the last frame, ``swap()`` presents.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import moderngl

log = logging.getLogger(__name__)


class SurfaceError(RuntimeError):
    """No window or GL context could be made; the message says why and what to try."""


@dataclass(frozen=True)
class WindowConfig:
    size: tuple[int, int] = (1280, 720)
    fullscreen: bool = False
    monitor: int = 0
    vsync: bool = True
    title: str = "dreamdeck"


class HeadlessSurface:
    """An offscreen EGL context: for tests, servers and benchmarks (no window, no display)."""

    has_window = False

    def __init__(self) -> None:
        try:
            self.ctx = moderngl.create_context(standalone=True, backend="egl", require=330)
        except Exception as exc:  # glcontext raises plain Exceptions naming the missing library
            raise SurfaceError(f"no headless OpenGL context (EGL): {exc}. "
                               "On Debian/Ubuntu: apt-get install libegl1 libgl1-mesa-dri") from exc
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
    actions = {glfw.KEY_SPACE: "next_scene", glfw.KEY_F: "fullscreen", glfw.KEY_H: "hud", glfw.KEY_ESCAPE: "quit"}
    for n in range(1, 10):
        actions[getattr(glfw, f"KEY_{n}")] = f"preset:{n}"
    return actions


class WindowSurface:
    """A glfw window with a GL 3.3 core context; fullscreen on a chosen monitor."""

    has_window = True

    def __init__(self, config: WindowConfig) -> None:
        import glfw  # imported here: glfw needs a display only when a window is asked for

        self.glfw = glfw
        self.config = config
        if not glfw.init():
            raise SurfaceError("cannot open a window: no display (set DISPLAY, or run with --headless)")
        glfw.window_hint(glfw.CONTEXT_VERSION_MAJOR, 3)
        glfw.window_hint(glfw.CONTEXT_VERSION_MINOR, 3)
        glfw.window_hint(glfw.OPENGL_PROFILE, glfw.OPENGL_CORE_PROFILE)
        glfw.window_hint(glfw.OPENGL_FORWARD_COMPAT, True)
        glfw.window_hint(glfw.AUTO_ICONIFY, False)  # a projector output must not minimise on focus loss
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
        if config.fullscreen:
            self.set_fullscreen(True)

    def _on_key(self, window, key, scancode, action, mods) -> None:
        if action == self.glfw.PRESS and key in self._actions:
            self._pending.append(self._actions[key])

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.glfw.get_framebuffer_size(self.window))  # type: ignore[return-value]

    @property
    def should_close(self) -> bool:
        return bool(self.glfw.window_should_close(self.window))

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
        glfw = self.glfw
        if on:
            monitors = glfw.get_monitors() or []
            if not monitors:
                log.warning("no monitor to go fullscreen on")
                return
            index = self.config.monitor
            if not 0 <= index < len(monitors):
                log.warning("monitor %d does not exist (%d found); using 0", index, len(monitors))
                index = 0
            x, y = glfw.get_window_pos(self.window)
            w, h = glfw.get_window_size(self.window)
            self._windowed_rect = (x, y, w, h)
            mode = glfw.get_video_mode(monitors[index])
            glfw.set_window_monitor(self.window, monitors[index], 0, 0, mode.size.width, mode.size.height,
                                    mode.refresh_rate)
            glfw.set_input_mode(self.window, glfw.CURSOR, glfw.CURSOR_HIDDEN)
        else:
            x, y, w, h = self._windowed_rect
            glfw.set_window_monitor(self.window, None, x, y, w, h, 0)
            glfw.set_input_mode(self.window, glfw.CURSOR, glfw.CURSOR_NORMAL)

    @property
    def fullscreen(self) -> bool:
        return self.glfw.get_window_monitor(self.window) is not None

    def toggle_fullscreen(self) -> None:
        self.set_fullscreen(not self.fullscreen)

    def close(self) -> None:
        self.ctx.release()
        self.glfw.destroy_window(self.window)
        self.glfw.terminate()
