"""Choice of Triton or torch, and the interpreter's version guard (``residency.kernels._dispatch``)."""

from __future__ import annotations

import pytest
import torch
from residency.kernels import _dispatch, moe_gather_gemm
from residency.kernels._dispatch import interpreter_incompatibility


@pytest.mark.parametrize(
    ("triton_version", "numpy_version", "broken"),
    [
        ("3.6.0", "2.4.0", True),
        ("3.6.0", "2.4.6", True),
        ("3.5.1+git8a1f", "3.0.0rc1", True),
        ("3.6.0", "2.3.5", False),
        ("3.7.0", "2.4.6", False),
        ("3.9.0", "2.4.0", False),
        ("3.10.0", "2.4.0", False),
        ("3.0.0", "1.26.4", False),
    ],
)
def test_interpreter_incompatibility_names_the_versions_and_the_fix(triton_version, numpy_version, broken):
    problem = interpreter_incompatibility(triton_version, numpy_version)
    if not broken:
        assert problem is None
        return
    assert triton_version in problem and numpy_version in problem
    assert "triton>=3.7" in problem and "numpy<2.4" in problem and "backend='torch'" in problem


def test_an_incompatible_interpreter_fails_before_any_launch(monkeypatch, device):
    if device != "cpu":
        pytest.skip("checks the CPU interpreter dispatch")
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.1")
    x = torch.randn(2, 8)
    problem = (x, torch.randn(4, 6, 8), torch.randn(4, 8, 6), torch.arange(4, dtype=torch.int32),
               torch.tensor([[0, 1], [2, 3]]), torch.rand(2, 2))  # fmt: skip
    with pytest.raises(RuntimeError, match="numpy<2.4"):
        moe_gather_gemm(*problem)
    # the torch reference is the way out, and it still works
    assert torch.isfinite(moe_gather_gemm(*problem, backend="torch")).all()
    monkeypatch.setattr(triton, "__version__", "3.7.0")
    assert torch.isfinite(moe_gather_gemm(*problem)).all()


def test_version_tuple_reads_leading_numbers():
    assert _dispatch._version_tuple("3.6.0+gitabc") == (3, 6, 0)
    assert _dispatch._version_tuple("2.4.0rc1") == (2, 4)
    assert _dispatch._version_tuple("2.13.0+cpu") == (2, 13, 0)


def test_library_wide_backend_switch(monkeypatch):
    from residency import kernels

    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    assert kernels.get_backend() == "auto"
    monkeypatch.setenv(kernels.BACKEND_ENV, "torch")
    assert kernels.get_backend() == "torch"
    with kernels.kernel_backend("triton"):
        assert kernels.get_backend() == "triton"  # the Python setting wins over the environment
    assert kernels.get_backend() == "torch"
    monkeypatch.setenv(kernels.BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="RESIDENCY_KERNELS='cuda'.*auto, triton, torch"):
        kernels.get_backend()
    with pytest.raises(ValueError, match="kernel backend"):
        kernels.set_backend("fast")


def test_backend_none_follows_the_switch(monkeypatch, device):
    """With backend=None the library-wide setting decides: "torch" never enters Triton."""
    if device != "cpu":
        pytest.skip("checks the CPU dispatch")
    from residency import kernels

    x = torch.randn(2, 8)
    problem = (x, torch.randn(4, 6, 8), torch.randn(4, 8, 6), torch.arange(4, dtype=torch.int32),
               torch.tensor([[0, 1], [2, 3]]), torch.rand(2, 2))  # fmt: skip
    calls = []
    monkeypatch.setattr(_dispatch, "_check_interpreter_ready", lambda: calls.append(1))
    with kernels.kernel_backend("torch"):
        moe_gather_gemm(*problem)
    assert calls == []
    with kernels.kernel_backend("triton"):
        moe_gather_gemm(*problem)
    assert calls == [1]
