"""Shared fixtures: tiny checkpoints written once per session."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

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

# The suite's tensors are tiny: torch's intra-op threads only add overhead, and on a loaded 2-core
# machine they slowed small ops 20-100x (the copy thread and numba's threads compete for the cores).
torch.set_num_threads(1)


@pytest.fixture
def load_benchmark(monkeypatch: pytest.MonkeyPatch):
    """Import a program of ``benchmarks/`` by name, the way running it sees its folder.

    The folder goes on ``sys.path`` (the programs import ``_machine`` and each other) and the
    module into ``sys.modules`` (dataclasses look their module up there), both undone after the test.
    """
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        return module

    return load


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


# 4 MoE layers x 512 experts x (2 x 256 x 256) fp32 weights = 1 GiB of experts, plus the rest
BIG_CHECKPOINT = dict(n_routed_experts=512, num_experts_per_tok=8, moe_intermediate_size=256, moe_latent_size=256,
                      hidden_size=128, moe_shared_expert_intermediate_size=128)


@pytest.fixture(scope="session")
def big_checkpoint(tmp_path_factory):
    """A checkpoint of more than 1 GiB in the real layout, written once per session: (folder, bytes)."""
    from residency.model.checkpoint import Checkpoint

    folder = write_tiny_checkpoint(tmp_path_factory.mktemp("big") / "ckpt", seed=0, **BIG_CHECKPOINT)
    return folder, Checkpoint(folder).total_bytes
