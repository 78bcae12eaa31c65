"""Sharing the output with other apps: virtual camera, NDI, Spout, Syphon. All optional.

Two shapes, because the transports differ:

- **Frames** (virtual camera through pyvirtualcam, NDI through cyndilib) take pixels in
  host memory. The render thread starts a one-frame-late readback when a frame is due
  (at the output's own rate) and hands the newest frame to a sender thread; a frame the
  sender has not taken yet is replaced, never queued: other apps want the picture now.
- **Textures** (Spout on Windows, Syphon on macOS) hand the GL texture itself to the
  other app on the GPU: one call on the render thread, nothing copied to the CPU.

Each package is imported only when its output starts, so none is needed to run the show.
A missing package, driver or platform is one clear error in the log and the output's
status; the output turns itself off and the show goes on.
"""

from __future__ import annotations

import logging
import sys
import threading
from fractions import Fraction
from typing import Any, Protocol

import moderngl
import numpy as np

from engine.outputs.readback import Pixels, Readback
from engine.status import RenderedFrame

log = logging.getLogger(__name__)

GL_TEXTURE_2D = 0x0DE1


class OutputUnavailable(RuntimeError):
    """This output cannot run here: the message says what is missing and how to get it."""


def _turn_off(output: Any, exc: Exception) -> None:
    """An output whose driver failed stays off and says why (call it from the ``except``):
    a missing driver or platform in one line, anything else with its traceback."""
    if isinstance(exc, OutputUnavailable):
        output.last_error = str(exc)
        log.error("%s off: %s (the show goes on)", output.name, exc)
    else:
        output.last_error = f"{type(exc).__name__}: {exc}"
        log.exception("%s off after an error (the show goes on)", output.name)


class Pace:
    """Which frames are due at ``fps`` on the show's clock, whatever the render rate.

    A frame late by a whole period restarts the beat from now instead of bunching up.
    """

    def __init__(self, fps: float) -> None:
        if not fps > 0:
            raise ValueError("fps must be positive")
        self.period = 1.0 / fps
        self._next: float | None = None

    def due(self, now: float) -> bool:
        if self._next is not None and now < self._next - 1e-6:  # 1e-6: clocks that add up float steps
            return False
        late = self._next is None or now - self._next >= self.period
        self._next = (now if late else self._next) + self.period
        return True


# -- frames ---------------------------------------------------------------------------------------


class FrameSender(Protocol):
    """Takes RGBA frames (top row first) on the sender thread."""

    description: str

    def open(self, size: tuple[int, int], fps: float) -> None: ...  # raises OutputUnavailable
    def send(self, rgba: np.ndarray) -> None: ...  # (h, w, 4) uint8
    def close(self) -> None: ...


class FrameShare:
    """An ``Output`` that feeds a ``FrameSender`` on its own thread with the newest frame."""

    def __init__(self, name: str, sender: FrameSender, fps: float = 30.0) -> None:
        self.name = name
        self.fps = fps
        self._pace = Pace(fps)
        self.sent = 0
        self.skipped = 0  # frames replaced by a newer one before the sender took them
        self.last_error: str | None = None
        self._sender = sender
        self._readback: Readback | None = None
        self._cond = threading.Condition()
        self._newest: Pixels | None = None
        self._running = False
        self._opened = False
        self._thread: threading.Thread | None = None

    @property
    def status(self) -> str:
        """One line for the HUD and the status page, after the name."""
        if self.last_error:
            return f"off: {self.last_error}"
        if not self._opened:
            return "starting"
        return f"{self._sender.description}  sent {self.sent}  skipped {self.skipped}"

    @property
    def waiting(self) -> bool:
        """A frame is read back and waiting for the sender thread."""
        with self._cond:
            return self._newest is not None

    def start(self) -> None:
        """The sender opens on its thread once the first frame gives the size."""

    def after_render(self, frame: RenderedFrame) -> None:
        if self.last_error or (self._thread is not None and not self._running):
            return  # failed, or stopped
        if self._thread is None:
            self._readback = Readback(frame.ctx, frame.size, buffers=3)
            self._running = True
            self._thread = threading.Thread(target=self._send_loop, args=(frame.size,), name=self.name, daemon=True)
            self._thread.start()
        assert self._readback is not None
        if self._pace.due(frame.time):
            self._offer(self._readback.request(frame.texture, frame.time))
        else:
            self._offer(self._readback.collect())

    def _offer(self, pixels: Pixels | None) -> None:
        if pixels is None:
            return
        with self._cond:
            if self._newest is not None and self._readback is not None:
                self._readback.give_back(self._newest)
                self.skipped += 1
            self._newest = pixels
            self._cond.notify()

    def _send_loop(self, size: tuple[int, int]) -> None:
        try:
            self._sender.open(size, self.fps)
            self._opened = True
            log.info("%s: %s", self.name, self._sender.description)
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._newest is not None or not self._running)
                    if not self._running:
                        return
                    pixels, self._newest = self._newest, None
                assert pixels is not None and self._readback is not None
                try:
                    frame = np.frombuffer(pixels.data, np.uint8).reshape(size[1], size[0], 4)
                    self._sender.send(frame)
                    self.sent += 1
                finally:
                    self._readback.give_back(pixels)
        except Exception as exc:  # a third-party driver may raise anything: off, loudly; the show goes on
            _turn_off(self, exc)
        finally:
            if self._opened:
                self._close_sender()

    def _close_sender(self) -> None:
        try:
            self._sender.close()
        except (RuntimeError, OSError) as exc:
            log.warning("%s: closing failed: %s", self.name, exc)

    def stop(self) -> None:
        with self._cond:
            self._running = False
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(5.0)
        if self._readback is not None:
            self._readback.release()
            self._readback = None


class PyVirtualCamSender:
    """A virtual camera other apps (OBS, Zoom, browsers) pick as a webcam: pyvirtualcam
    over v4l2loopback on Linux, OBS's virtual camera on Windows and macOS."""

    def __init__(self, device: str | None = None) -> None:
        self.device = device
        self.description = "(not open)"
        self._camera: Any = None

    def open(self, size: tuple[int, int], fps: float) -> None:
        try:
            import pyvirtualcam
        except ImportError:
            raise OutputUnavailable(
                "pyvirtualcam is not installed (pip install pyvirtualcam; on Linux also the "
                "v4l2loopback kernel module: modprobe v4l2loopback)"
            ) from None
        try:
            self._camera = pyvirtualcam.Camera(
                size[0], size[1], fps, fmt=pyvirtualcam.PixelFormat.RGB, device=self.device
            )
        except RuntimeError as exc:  # no driver or device: pyvirtualcam says which and how to fix it
            raise OutputUnavailable(f"virtual camera: {exc}") from None
        self.description = f"{self._camera.device} {size[0]}x{size[1]} @ {fps:g} fps"

    def send(self, rgba: np.ndarray) -> None:
        self._camera.send(np.ascontiguousarray(rgba[:, :, :3]))

    def close(self) -> None:
        if self._camera is not None:
            self._camera.close()


class NdiSender:
    """An NDI source on the local network (cyndilib bundles the NDI runtime)."""

    def __init__(self, source_name: str = "dreamdeck") -> None:
        self.source_name = source_name
        self.description = "(not open)"
        self._sender: Any = None

    def open(self, size: tuple[int, int], fps: float) -> None:
        try:
            from cyndilib import FourCC, Sender, VideoSendFrame
        except ImportError as exc:
            raise OutputUnavailable(f"NDI needs cyndilib (pip install cyndilib): {exc}") from None
        frame = VideoSendFrame()
        frame.set_resolution(*size)
        frame.set_frame_rate(Fraction(fps).limit_denominator(1001))
        frame.set_fourcc(FourCC.RGBA)
        sender = Sender(self.source_name, clock_video=False)  # the show paces itself
        sender.set_video_frame(frame)
        sender.open()
        self._sender = sender
        self.description = f"'{sender.name}' {size[0]}x{size[1]} @ {fps:g} fps"

    def send(self, rgba: np.ndarray) -> None:
        if not self._sender.write_video(rgba.reshape(-1)):
            raise RuntimeError("the NDI sender refused a frame")

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()


def virtual_camera(fps: float = 30.0, device: str | None = None) -> FrameShare:
    return FrameShare("virtualcam", PyVirtualCamSender(device), fps)


def ndi(source_name: str = "dreamdeck", fps: float = 30.0) -> FrameShare:
    return FrameShare("ndi", NdiSender(source_name), fps)


# -- textures -------------------------------------------------------------------------------------


class TextureShare:
    """An ``Output`` that publishes the output texture on the GPU, on the render thread."""

    platform = ""  # sys.platform prefix it runs on
    name = ""

    def __init__(self, server_name: str = "dreamdeck", fps: float = 60.0) -> None:
        self.server_name = server_name
        self.fps = fps
        self.sent = 0
        self.last_error: str | None = None
        self._server: Any = None
        self._pace = Pace(fps)

    @property
    def status(self) -> str:
        """One line for the HUD and the status page, after the name."""
        if self.last_error:
            return f"off: {self.last_error}"
        return f"'{self.server_name}'  sent {self.sent}"

    def start(self) -> None:
        """Opened on the first frame: the server must be made with the show's GL context current."""

    def after_render(self, frame: RenderedFrame) -> None:
        if self.last_error or not self._pace.due(frame.time):
            return
        texture = frame.texture
        try:
            if self._server is None:
                if not sys.platform.startswith(self.platform):
                    raise OutputUnavailable(f"{self.name} runs on {self.platform} only")
                self._server = self._open()
                log.info("%s: publishing %r", self.name, self.server_name)
            self._publish(texture)
            self.sent += 1
        except Exception as exc:  # a third-party driver may raise anything: off, loudly; the show goes on
            _turn_off(self, exc)

    def _open(self) -> Any:
        raise NotImplementedError

    def _publish(self, texture: moderngl.Texture) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class SpoutOutput(TextureShare):
    """Spout (Windows): Resolume, TouchDesigner, OBS... receive the texture on the GPU.

    Our textures store the top row first, which is what Spout expects: no inversion.
    """

    platform, name = "win32", "spout"

    def _open(self) -> Any:
        try:
            import SpoutGL
        except ImportError as exc:
            raise OutputUnavailable(f"Spout needs SpoutGL (pip install SpoutGL): {exc}") from None
        server = SpoutGL.SpoutSender()
        server.setSenderName(self.server_name)
        return server

    def _publish(self, texture: moderngl.Texture) -> None:
        if not self._server.sendTexture(texture.glo, GL_TEXTURE_2D, texture.width, texture.height, False, 0):
            raise RuntimeError("Spout refused the frame (sendTexture)")

    def stop(self) -> None:
        if self._server is not None:
            self._server.releaseSender()
            self._server = None


class SyphonOutput(TextureShare):
    """Syphon (macOS): MadMapper, Resolume, VDMX... receive the texture on the GPU.

    Syphon's frames have GL's bottom-up rows; ours are top row first, hence ``is_flipped``.
    """

    platform, name = "darwin", "syphon"

    def _open(self) -> Any:
        try:
            import syphon

            return syphon.SyphonOpenGLServer(self.server_name)  # on the context current now: the show's
        except ImportError as exc:  # syphon-python itself, or PyOpenGL (its "opengl" extra)
            raise OutputUnavailable(
                f"Syphon needs syphon-python with OpenGL (pip install 'syphon-python[opengl]'): {exc}"
            ) from None

    def _publish(self, texture: moderngl.Texture) -> None:
        self._server.publish_frame_texture(texture.glo, size=texture.size, is_flipped=True)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
