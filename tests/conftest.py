"""Shared fixtures: tiny checkpoints written once per session."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

# Triton binds its library functions to interpreter or compiled mode when first imported. On a
# machine without a GPU the kernel tests need interpreter mode, so import triton here, first, with
# TRITON_INTERPRET=1, then restore the environment so other tests do not run through the
# interpreter (tests/kernels/conftest.py sets the variable per kernel test).
if (
    importlib.util.find_spec("triton") is not None
    and "triton" not in sys.modules
    and not (torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1")
):
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.language  # noqa: F401

    if _previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _previous

from residency.testing import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """The default tiny model (8 layers, 32 experts, top-4, latent MoE), single file, fp32."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    from residency import OffloadedNemotron

    return OffloadedNemotron.from_pretrained(tiny_checkpoint, device="cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
