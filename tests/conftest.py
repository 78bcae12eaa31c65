"""Shared fixtures: a real headless GL context (EGL on Mesa llvmpipe here)."""

from __future__ import annotations

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
