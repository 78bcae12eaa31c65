"""Fixtures every diffusion test file shares (import them: pytest uses imported fixtures).

Kept out of conftest.py so that tests which do not need torch never import it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

from engine.diffusion.configs import build_random_model
from engine.params import ParamRegistry


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Nothing in a diffusion test may reach a hub, whatever the machine's settings."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the build machine is shared: two threads per process thrash
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    return build_random_model("tiny")


TIMEOUT = 120.0  # generous: the build machine is shared and slow; nothing here is a speed test


def wait_for(condition: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
    """Poll a condition that a worker thread will make true; False if it never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


class StillFeed:
    """A camera on a still scene: the same picture, a new frame (key) every call."""

    def __init__(self) -> None:
        self.image = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
        self._lock = threading.Lock()
        self.key = 0

    def __call__(self) -> tuple[np.ndarray, int]:
        with self._lock:
            self.key += 1
            return self.image, self.key


def set_params(params: ParamRegistry, values: dict) -> None:
    """Set values and land them at once, smoothing included (what a frame boundary does)."""
    params.set_many(values)
    params.apply_pending(10.0)


def blob_frames(count: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth coloured blobs (size x size uint8): content a model can tell apart (unlike white noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(count):
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.4)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        colour, background = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        out.append((blob * colour + (1 - blob) * background).astype(np.uint8))
    return out
