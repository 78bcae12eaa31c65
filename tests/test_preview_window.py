"""Real windows on an Xvfb display: the preview beside the projector window, fullscreen by
monitor name, and the screensaver kept off while the show runs.

Each test runs a small show in a subprocess (glfw owns a process's display connection):
a known picture (four coloured quadrants) presented through the same Presenter and
PreviewView the app uses, then reads the X screen with ImageMagick's ``import``.
Every wait is bounded; nothing asserts on wall-clock speed.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import xvfb
from engine.render.surface import pick_monitor

pytestmark = pytest.mark.window

ROOT = Path(__file__).resolve().parents[1]
SCREEN = (1280, 720)
MAIN = (480, 270)
PREVIEW = (320, 180)
GAP = 16  # the preview sits this far right of the main window (no window manager: no frame)
TIMEOUT = 30.0
RED, GREEN, BLUE, YELLOW = (230, 30, 30), (30, 210, 40), (40, 50, 220), (240, 220, 20)
HUD_LINES = ["dreamdeck", "preview"]

SHOW = f"""
import json, logging, os, sys, time
import numpy as np
from engine.catalog import SHADERS_DIR
from engine.render.output import OutputTransform, Presenter, PreviewView
from engine.render.shaders import ShaderLibrary
from engine.render.surface import WindowConfig, WindowSurface

config, transform, stop = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
hidden = json.loads(sys.argv[4])  # tools to pretend are not installed
logging.basicConfig(level=logging.INFO)
if hidden:
    import shutil
    import engine.render.surface as surface_module
    which = shutil.which
    surface_module.shutil.which = lambda name, *a, **k: None if name in hidden else which(name, *a, **k)
for key in ("size", "preview_size"):
    if key in config:
        config[key] = tuple(config[key])
surface = WindowSurface(WindowConfig(**config))
image = np.zeros((36, 64, 3), np.uint8)
image[:18, :32], image[:18, 32:], image[18:, 32:], image[18:, :32] = {(RED, GREEN, BLUE, YELLOW)}
texture = surface.ctx.texture((64, 36), 3, image.tobytes())
texture.repeat_x = texture.repeat_y = False  # as the compositor's output: no colour wraps in at the edges
shaders = ShaderLibrary(surface.ctx, SHADERS_DIR)
presenter = Presenter(shaders)
preview = PreviewView(surface.preview, SHADERS_DIR) if surface.preview else None
frames = 0
while not os.path.exists(stop) and frames < 20000:
    surface.poll()
    presenter.present(texture, surface.size, OutputTransform(**transform))
    if preview is not None:
        preview.draw(texture, {HUD_LINES})
    surface.swap()
    frames += 1
    if frames == 5:
        glfw = surface.glfw
        facts = dict(size=surface.size, fullscreen=surface.fullscreen, monitors=surface.monitors(),
                     keep_awake=surface.keep_awake.method if surface.keep_awake else None,
                     main_pos=glfw.get_window_pos(surface.window), x11_window=glfw.get_x11_window(surface.window))
        if surface.preview is not None:
            facts.update(preview_size=surface.preview.size, preview_pos=glfw.get_window_pos(surface.preview.window))
        print(json.dumps(facts), flush=True)
    time.sleep(0.01)
if preview is not None:
    preview.release()
shaders.release()
surface.close()
print("closed", flush=True)
"""


# -- the display ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def display() -> Iterator[str]:
    """A private Xvfb server on a free display number."""
    with xvfb(SCREEN, timeout=TIMEOUT) as name:
        yield name


class Show:
    """The SHOW script on the display; ``facts`` is what it printed once its windows were up."""

    def __init__(
        self,
        display: str,
        tmp_path: Path,
        config: dict,
        transform: dict | None = None,
        hidden_tools: tuple[str, ...] = (),
        path: str | None = None,
    ) -> None:
        self.stop_file = tmp_path / "stop"
        env = {k: v for k, v in os.environ.items() if k != "WAYLAND_DISPLAY"}
        env["DISPLAY"] = display
        if path is not None:
            env["PATH"] = path
        args = [json.dumps(config), json.dumps(transform or {}), str(self.stop_file), json.dumps(hidden_tools)]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SHOW, *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.facts = json.loads(self._line("the show's windows"))

    def _line(self, what: str) -> str:
        assert self.proc.stdout is not None
        if not select.select([self.proc.stdout], [], [], TIMEOUT)[0]:
            raise AssertionError(f"no output from the show within {TIMEOUT:.0f} s waiting for {what}")
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(
                f"the show ended (rc {self.proc.wait()}) before {what}:\n{self.proc.stderr.read()[-3000:]}"
            )
        return line

    def finish(self) -> str:
        """Ask the show to close its windows; return its log (stderr)."""
        self.stop_file.touch()
        try:
            out, err = self.proc.communicate(timeout=TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.communicate()
        assert self.proc.returncode == 0 and "closed" in out, err[-3000:]
        return err


def screen(display: str) -> np.ndarray:
    """The whole X screen now, as RGB ints."""
    result = subprocess.run(
        ["import", "-display", display, "-window", "root", "png:-"], capture_output=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    image = cv2.imdecode(np.frombuffer(result.stdout, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape == (SCREEN[1], SCREEN[0], 3)
    return image[:, :, ::-1].astype(int)


def close_to(pixel: np.ndarray, colour: tuple[int, int, int]) -> bool:
    return bool(np.abs(pixel - colour).max() <= 12)


def shot_when(display: str, show: Show, checks: dict[str, tuple[tuple[int, int], tuple[int, int, int]]]) -> np.ndarray:
    """Screenshots until every named (row, column) has its colour; a clear message if none does."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        image = screen(display)
        wrong = {name: tuple(image[rc]) for name, (rc, colour) in checks.items() if not close_to(image[rc], colour)}
        if not wrong:
            return image
        if time.monotonic() > deadline or show.proc.poll() is not None:
            raise AssertionError(f"on screen: {wrong} (expected {checks})")
        time.sleep(0.05)


def hud_text_pixels(region: np.ndarray) -> int:
    """Light-grey text pixels (the HUD draws its text in (235, 235, 235))."""
    spread = region.max(axis=2) - region.min(axis=2)
    return int(((region.min(axis=2) > 150) & (spread < 16)).sum())


def quadrant_points(x0: int, y0: int, size: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """(row, column) on screen of the middle of each quadrant of a window at (x0, y0)."""
    w, h = size
    return {
        "tl": (y0 + h // 4, x0 + w // 4),
        "tr": (y0 + h // 4, x0 + 3 * w // 4),
        "br": (y0 + 3 * h // 4, x0 + 3 * w // 4),
        "bl": (y0 + 3 * h // 4, x0 + w // 4),
    }


# -- tests -----------------------------------------------------------------------------------------


def test_preview_window_shows_the_output_with_the_hud_beside_the_clean_projector_window(display, tmp_path):
    show = Show(
        display,
        tmp_path,
        {"size": MAIN, "preview": True, "preview_size": PREVIEW, "vsync": False},
        transform={"rotate": 180},
    )  # the projector hangs upside down; the preview stays upright
    try:
        facts = show.facts
        assert facts["size"] == list(MAIN) and facts["preview_size"] == list(PREVIEW)
        assert facts["fullscreen"] is False
        px, py = facts["preview_pos"]
        assert (px, py) == (MAIN[0] + GAP, 0), "the preview should sit just right of the projector window"
        main, preview = quadrant_points(0, 0, MAIN), quadrant_points(px, py, PREVIEW)
        image = shot_when(
            display,
            show,
            {
                "main tl (turned: the image's br)": (main["tl"], BLUE),
                "main br": (main["br"], RED),
                "main tr": (main["tr"], YELLOW),
                "main bl": (main["bl"], GREEN),
                "preview tr (upright)": (preview["tr"], GREEN),
                "preview br": (preview["br"], BLUE),
                "preview bl": (preview["bl"], YELLOW),
                "preview tl, beside the HUD": ((py + 60, px + 120), RED),
            },
        )
        if os.environ.get("DREAMDECK_SHOTS"):  # to look at it: DREAMDECK_SHOTS=folder pytest ...
            cv2.imwrite(str(Path(os.environ["DREAMDECK_SHOTS"]) / "preview.png"), image[:, :, ::-1].astype(np.uint8))
        hud_box = (slice(0, 50), slice(0, 110))  # two short lines of HUD text
        preview_corner = image[py : py + PREVIEW[1], px : px + PREVIEW[0]][hud_box]
        main_corner = image[: MAIN[1], : MAIN[0]][hud_box]
        assert hud_text_pixels(preview_corner) > 40, "the preview has no HUD text"
        assert hud_text_pixels(main_corner) == 0, "the projector window shows HUD text"
        assert np.median(preview_corner[..., 0]) < 0.7 * RED[0], "the HUD panel does not darken the picture under it"
        gap = image[: PREVIEW[1], MAIN[0] + 2 : MAIN[0] + GAP - 2]
        assert gap.max() == 0, "something drew between the two windows"
    finally:
        show.finish()


@pytest.mark.parametrize("monitor", ["SCR", "HDMI"])
def test_fullscreen_on_a_monitor_chosen_by_name_covers_the_screen(display, tmp_path, monitor):
    show = Show(display, tmp_path, {"size": (320, 180), "fullscreen": True, "monitor": monitor, "vsync": False})
    try:
        facts = show.facts
        assert facts["fullscreen"] and facts["size"] == list(SCREEN), facts
        points = quadrant_points(0, 0, SCREEN)
        image = shot_when(
            display,
            show,
            {
                "tl": (points["tl"], RED),
                "tr": (points["tr"], GREEN),
                "br": (points["br"], BLUE),
                "bl": (points["bl"], YELLOW),
            },
        )
        assert image[[2, 2, -3, -3], [2, -3, 2, -3]].min() > 0, "the picture does not reach the screen's corners"
    finally:
        err = show.finish()
    names = facts["monitors"]
    if monitor == "SCR":
        assert any("scr" in n.lower() for n in names), f"Xvfb's monitor is called {names} here"
        assert "no monitor named like" not in err
    else:  # a projector that is not plugged in: said once, with the monitors there are, and shown on 0
        assert re.search(r"no monitor named like 'HDMI'; using 0 \(monitors: 0: \w+", err), err[-2000:]


def recorder(bin_dir: Path, name: str, log: Path, then: str | None = None) -> None:
    """A stand-in ``name`` on PATH that appends its arguments to ``log``, then runs ``then`` (or exits 0)."""
    tail = f'exec {then} "$@"' if then else "exit 0"
    shim = bin_dir / name
    shim.write_text(f'#!/bin/sh\necho "$*" >> {log}\n{tail}\n')
    shim.chmod(0o755)


def xset_saver(display: str, xset: str) -> str:
    """The X screensaver's ``timeout cycle`` as the real ``xset q`` reports them."""
    text = subprocess.run(
        [xset, "-display", display, "q"], check=True, timeout=TIMEOUT, capture_output=True, text=True
    ).stdout
    m = re.search(r"timeout:\s*(\d+)\s+cycle:\s*(\d+)", text)
    assert m, text
    return f"{m[1]} {m[2]}"


@pytest.mark.parametrize("method", ["xdg-screensaver", "xset", "none"])
def test_the_screensaver_is_held_off_while_the_window_is_open_and_given_back_after(display, tmp_path, method):
    """What dreamdeck asks for, read from stand-ins on PATH that record their arguments:
    ``xdg-screensaver suspend <our window>`` then ``resume`` it; or, without xdg-screensaver,
    ``xset s off`` then the timeout it read before. (Xvfb keeps its screensaver timeout
    whatever clients ask, so the X server cannot show the effect; what xdg-screensaver
    does inside is the desktop's business, not checked here.)"""
    real_xset = shutil.which("xset")
    if method == "xset" and real_xset is None:
        pytest.skip("xset is needed here (apt-get install x11-xserver-utils)")
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    if method == "xdg-screensaver":
        recorder(bin_dir, "xdg-screensaver", log)
    elif method == "xset":
        saved = xset_saver(display, real_xset)
        recorder(bin_dir, "xset", log, then=real_xset)  # dreamdeck reads the real `xset q` to give it back
    hidden = {"xdg-screensaver": (), "xset": ("xdg-screensaver",), "none": ("xdg-screensaver", "xset")}[method]

    show = Show(
        display,
        tmp_path,
        {"size": (160, 90), "vsync": False},
        hidden_tools=hidden,
        path=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    )
    try:
        assert show.facts["keep_awake"] == method
        during = log.read_text().splitlines() if log.exists() else []
    finally:
        err = show.finish()
    after = log.read_text().splitlines() if log.exists() else []
    if method == "none":
        assert "cannot keep the display awake: install xdg-utils or x11-xserver-utils" in err
        return
    assert f"keeping the display awake: {method}" in err
    if method == "xdg-screensaver":
        window = hex(show.facts["x11_window"])
        assert during == [f"suspend {window}"], f"the screensaver was not suspended for our window: {during}"
        assert after == [f"suspend {window}", f"resume {window}"], f"not given back: {after}"
    else:
        assert [c for c in during if c != "q"] == ["s off"], f"nobody turned the X screensaver off: {during}"
        assert [c for c in after if c != "q"] == ["s off", f"s {saved}"], f"not given back: {after}"


def test_pick_monitor_by_index_or_name() -> None:
    names = ["eDP-1 Built-in", "HDMI-1 Epson", "DP-2 Dell"]
    assert pick_monitor(names, 1) == (1, None)
    assert pick_monitor(names, "hdmi") == (1, None)
    assert pick_monitor(names, "dp-2") == (2, None)
    assert pick_monitor(names, "DP") == (2, None)  # a name that starts with it beats "eDP-1"
    assert pick_monitor(names, "epson") == (1, None)
    assert pick_monitor(names, "hdmi-1 epson") == (1, None)
    index, warning = pick_monitor(names, "Barco")
    assert index == 0 and "no monitor named like 'Barco'" in warning and "1: HDMI-1 Epson" in warning
    index, warning = pick_monitor(names, 5)
    assert index == 0 and "monitor 5 does not exist" in warning
    assert pick_monitor([], 0) == (0, "no monitor found")
