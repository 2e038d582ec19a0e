"""Shared fixtures: tiny checkpoints written once per session."""

from __future__ import annotations

import pytest
import torch

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
