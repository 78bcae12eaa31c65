"""Fixtures every diffusion test file shares (import them: pytest uses imported fixtures).

Kept out of conftest.py so that tests which do not need torch never import it.
"""

from __future__ import annotations

import time
from typing import Callable

import pytest
import torch

from engine.diffusion.configs import build_random_model


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
