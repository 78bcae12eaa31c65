"""The real window: ``dreamdeck run`` on an Xvfb display, seen through X screenshots.

Xvfb gives a real X server (GL through Mesa), ``import`` (ImageMagick) reads what is on
its screen, and XTest (libXtst) presses keys as a performer would. Every wait is a
polling loop bounded by a timeout; no test asserts on wall-clock speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import xvfb

pytestmark = pytest.mark.window

ROOT = Path(__file__).resolve().parents[1]
SCREEN = (1280, 720)
WINDOW = (960, 540)  # with no window manager, the window sits at the screen's top-left corner
TIMEOUT = 30.0
HUD_REGION = (slice(0, 80), slice(0, 240))  # rows, columns of the HUD panel's first lines
XK_h, XK_Escape = 0x68, 0xFF1B


@pytest.fixture(scope="module")
def display() -> Iterator[str]:
    """A private Xvfb server on a free display number."""
    with xvfb(SCREEN, "-br", timeout=TIMEOUT) as name:
        yield name


def dreamdeck_command() -> list[str]:
    script = shutil.which("dreamdeck")
    return [script] if script else [sys.executable, "-m", "engine"]


def start_run(display: str, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "WAYLAND_DISPLAY"}
    env["DISPLAY"] = display
    return subprocess.Popen(
        [*dreamdeck_command(), "run", "--source", "pattern", "--size", f"{WINDOW[0]}x{WINDOW[1]}", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )


def finish(proc: subprocess.Popen, timeout: float = 60) -> str:
    """Wait for the run to end; return its stderr (the log)."""
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return err


def screen(display: str) -> np.ndarray:
    """The whole X screen now, as BGR."""
    result = subprocess.run(
        ["import", "-display", display, "-window", "root", "png:-"], capture_output=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    image = cv2.imdecode(np.frombuffer(result.stdout, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (SCREEN[1], SCREEN[0], 3), "import gave no screen image"
    return image


def window_area(image: np.ndarray) -> np.ndarray:
    return image[: WINDOW[1], : WINDOW[0]].astype(int)


def shot_when(
    display: str, proc: subprocess.Popen, condition: Callable[[np.ndarray], bool], what: str, timeout: float = TIMEOUT
) -> np.ndarray:
    """Screenshots until one satisfies ``condition``, taken while the run is still going."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}:\n{proc.stderr.read()[-2000:]}")
        image = screen(display)
        if condition(image) and proc.poll() is None:  # still running: the window was there for the shot
            return image
        time.sleep(0.05)
    raise AssertionError(f"no screenshot showed {what} within {timeout:.0f} s")


def not_blank(image: np.ndarray) -> bool:
    return window_area(image).std() > 20


def hud_text_pixels(image: np.ndarray) -> int:
    """Light-grey text pixels in the HUD's corner (the HUD draws its text in (235, 235, 235))."""
    region = image[HUD_REGION].astype(int)
    spread = region.max(axis=2) - region.min(axis=2)
    return int(((region.min(axis=2) > 150) & (spread < 16)).sum())


class Keyboard:
    """Key presses through the XTest extension, as if typed on the X server's keyboard."""

    def __init__(self, display: str) -> None:
        x11_name, xtst_name = ctypes.util.find_library("X11"), ctypes.util.find_library("Xtst")
        if not x11_name or not xtst_name:
            pytest.skip("libX11 / libXtst not found: cannot press keys (apt-get install libxtst6)")
        self.x11, self.xtst = ctypes.CDLL(x11_name), ctypes.CDLL(xtst_name)
        self.x11.XOpenDisplay.argtypes = [ctypes.c_char_p]
        self.x11.XOpenDisplay.restype = ctypes.c_void_p
        self.x11.XKeysymToKeycode.argtypes = [ctypes.c_void_p, ctypes.c_ulong]
        self.x11.XKeysymToKeycode.restype = ctypes.c_ubyte
        self.x11.XFlush.argtypes = self.x11.XCloseDisplay.argtypes = [ctypes.c_void_p]
        self.xtst.XTestFakeKeyEvent.argtypes = [ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_ulong]
        self.xtst.XTestFakeMotionEvent.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_ulong,
        ]
        self.dpy = self.x11.XOpenDisplay(display.encode())
        assert self.dpy, f"cannot open display {display}"
        # no window manager: keys go to the window under the pointer
        self.xtst.XTestFakeMotionEvent(self.dpy, -1, WINDOW[0] // 2, WINDOW[1] // 2, 0)
        self.x11.XFlush(self.dpy)

    def press(self, keysym: int) -> None:
        code = self.x11.XKeysymToKeycode(self.dpy, keysym)
        assert code, f"no keycode for keysym {keysym:#x}"
        self.xtst.XTestFakeKeyEvent(self.dpy, code, True, 0)
        self.xtst.XTestFakeKeyEvent(self.dpy, code, False, 0)
        self.x11.XFlush(self.dpy)

    def close(self) -> None:
        self.x11.XCloseDisplay(self.dpy)


# -- tests ------------------------------------------------------------------------------------


def test_window_shows_live_frames_and_exits_cleanly(display: str) -> None:
    proc = start_run(display, "--frames", "240")
    try:
        first = shot_when(display, proc, not_blank, "a non-blank window")
        time.sleep(0.2)  # some frames later
        second = shot_when(display, proc, not_blank, "the window still showing")
    finally:
        err = finish(proc)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert re.search(r"\b240 frames\b", err), err[-1000:]
    change = np.abs(window_area(first) - window_area(second)).mean()
    assert change > 2, f"two screenshots apart look the same (mean change {change:.2f}): the window is frozen"
    outside = first[WINDOW[1] :].astype(int)
    assert outside.max() == 0, "something drew outside the window"


def test_hud_panel_shows_and_the_h_key_hides_it(display: str) -> None:
    proc = start_run(display, "--frames", "3000")  # ended by Esc below
    keyboard = None
    try:
        with_hud = shot_when(
            display, proc, lambda im: not_blank(im) and hud_text_pixels(im) > 200, "the HUD text in the top-left corner"
        )
        panel = with_hud[HUD_REGION].astype(int)
        below = with_hud[100:180, 0:240].astype(int)
        assert np.median(panel) < np.median(below) + 5, "the HUD panel does not darken the picture under it"

        keyboard = Keyboard(display)
        keyboard.press(XK_h)
        without = shot_when(
            display,
            proc,
            lambda im: not_blank(im) and hud_text_pixels(im) < 20,
            "the HUD gone after pressing H",
            timeout=15,
        )
        assert hud_text_pixels(with_hud) > 10 * max(1, hud_text_pixels(without))

        keyboard.press(XK_h)
        shot_when(
            display, proc, lambda im: hud_text_pixels(im) > 200, "the HUD back after pressing H again", timeout=15
        )
        keyboard.press(XK_Escape)
        err = finish(proc, timeout=30)
    finally:
        if keyboard is not None:
            keyboard.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    frames = int(re.search(r"(\d+) frames, render", err)[1])
    assert frames < 3000, "Esc did not end the run"
