"""Fixtures every diffusion test file shares (import them: pytest uses imported fixtures).

Kept out of conftest.py so that tests which do not need torch never import it.
"""

from __future__ import annotations

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
