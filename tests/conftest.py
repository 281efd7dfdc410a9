"""Shared test configuration.

Tests that need a Hopper GPU are marked ``@pytest.mark.gpu`` (the marker is registered in
pyproject.toml) and may also take the ``requires_hopper`` fixture. Either way they are
skipped, with the reason given, unless torch sees a CUDA device of compute capability 9.0.
Nothing here touches the GPU while tests are collected, so collection works on machines
without CUDA.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest

HOPPER = (9, 0)


def load_script(path: Path):
    """A script of the repository (an example, a benchmark) imported as a module, without
    running its ``__main__`` block."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=None)
def hopper_skip_reason() -> str | None:
    """``None`` when a Hopper (sm_90) GPU can be used here, else why not."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "needs a Hopper (sm_90) GPU: torch.cuda.is_available() is False"
    capability = torch.cuda.get_device_capability()
    if tuple(capability) != HOPPER:
        name = torch.cuda.get_device_name()
        return f"needs a Hopper (sm_90) GPU: found {name} with compute capability {capability[0]}.{capability[1]}"
    return None


def has_hopper() -> bool:
    """True when a Hopper (sm_90) GPU can be used here."""
    return hopper_skip_reason() is None


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = hopper_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture
def requires_hopper():
    """Skips the test unless a Hopper (sm_90) GPU is present; returns its torch device."""
    reason = hopper_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    import torch

    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def each_device(request):
    """The test once with CPU tensors and once on a Hopper GPU (skipped without one)."""
    if request.param == "cuda":
        request.getfixturevalue("requires_hopper")
    return request.param
