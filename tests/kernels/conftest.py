"""Kernel tests: Triton in the CPU interpreter (fp32, small shapes), or compiled when a GPU is present.

Without a usable GPU the tests run the kernels in the Triton interpreter. ``TRITON_INTERPRET=1``
must be set when triton is first imported (its library functions bind then), and it must not leak
to the other test folders, whose CPU tests would then run through the interpreter. So the root
``tests/conftest.py`` imports triton once with the variable set, before any test module can import
it, and restores the environment; each test of this folder sets it again for its own duration.

On a CUDA machine the same tests run compiled on the GPU (fp32), and the ``gpu``-marked tests add
bf16 checks. ``torch.empty``/``empty_like`` return NaN-poisoned memory in every test here, so a
kernel that leaves an output or workspace element unwritten, or reads one it should not, fails.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None

_EMPTY = {"empty": torch.empty, "empty_like": torch.empty_like}


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bool:
        return t.fill_(True)
    return t.fill_(float("nan") if t.is_floating_point() else 1 << 30)


@pytest.fixture(autouse=True)
def kernel_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interpreter on CPU (compiled on GPU), and torch.empty(_like) returning poisoned memory."""
    if request.node.get_closest_marker("gpu") is None:
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        if not ON_GPU:
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    for name, fn in _EMPTY.items():
        monkeypatch.setattr(torch, name, lambda *a, _fn=fn, **kw: _poison(_fn(*a, **kw)))


@pytest.fixture
def device() -> str:
    """Where the kernel tests run: ``"cuda"`` (compiled) or ``"cpu"`` (interpreter)."""
    return DEVICE

