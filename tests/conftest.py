"""Shared fixtures: a real headless GL context (EGL on Mesa llvmpipe here)."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def gl_ctx():
    moderngl = pytest.importorskip("moderngl")
    ctx = moderngl.create_context(standalone=True, backend="egl", require=330)
    yield ctx
    ctx.release()


@pytest.fixture
def shader_root(tmp_path):
    """A private copy of shaders/ that a test may edit (hot reload tests)."""
    import shutil

    dst = tmp_path / "shaders"
    shutil.copytree(ROOT / "shaders", dst)
    return dst


@pytest.fixture(autouse=True)
def private_state(tmp_path_factory, monkeypatch):
    """Each test (and every `dreamdeck` it starts) keeps its saved state and MIDI map to itself."""
    home = tmp_path_factory.mktemp("xdg")
    monkeypatch.setenv("XDG_STATE_HOME", str(home / "state"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))


def _wait_until_it_answers(display: str, deadline: float) -> None:
    """Xvfb names its display when its socket listens; a client has been seen to be refused
    just after (a loaded machine, a display number reused at once): ask until it answers."""
    if shutil.which("xdpyinfo") is None:
        return
    while time.monotonic() < deadline:
        done = subprocess.run(
            ["xdpyinfo", "-display", display], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10
        )
        if done.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"Xvfb on {display} never answered")


@contextlib.contextmanager
def xvfb(screen: tuple[int, int], *extra: str, timeout: float = 30.0) -> Iterator[str]:
    """A private Xvfb server on a free display number (Xvfb picks it: -displayfd); yields ":N".

    Skips when Xvfb is missing; fails when ImageMagick's `import` (the screenshot tool) is.
    """
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (apt-get install xvfb)")
    if shutil.which("import") is None:
        pytest.fail("ImageMagick's `import` is needed to read the screen (apt-get install imagemagick)")
    read_end, write_end = os.pipe()
    server = subprocess.Popen(
        [
            "Xvfb",
            "-displayfd",
            str(write_end),
            "-screen",
            "0",
            f"{screen[0]}x{screen[1]}x24",
            *extra,
            "-nolisten",
            "tcp",
        ],
        pass_fds=(write_end,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    os.close(write_end)
    try:
        number = b""
        deadline = time.monotonic() + timeout
        while not number.endswith(b"\n") and time.monotonic() < deadline:
            if select.select([read_end], [], [], 0.5)[0]:
                chunk = os.read(read_end, 16)
                if not chunk:
                    break
                number += chunk
        if not number.strip().isdigit():
            server.kill()
            _, err = server.communicate(timeout=10)
            raise RuntimeError(f"Xvfb did not start: {err.decode(errors='replace')[-500:]}")
        display = f":{number.strip().decode()}"
        _wait_until_it_answers(display, deadline)
        yield display
    finally:
        os.close(read_end)
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
