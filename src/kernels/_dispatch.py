"""Choice between a Triton kernel and its torch reference.

Rules (the same for every public kernel function):

- ``backend="torch"``: always the torch reference.
- ``backend="triton"``: always Triton; on CPU tensors this needs ``TRITON_INTERPRET=1``.
- ``backend="auto"``: Triton for CUDA tensors, Triton on CPU when ``TRITON_INTERPRET=1``, else the
  torch reference.

Triton kernels live in modules of their own (``*_kernel(s).py``) that the launchers import at the
first launch; importing ``residency.kernels`` never imports triton. That matters for the CPU
interpreter: triton's library functions (``tl.sum``, ``tl.sigmoid`` ...) bind to the compiler or to
the interpreter when triton is first imported, so ``TRITON_INTERPRET=1`` must be set by then.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import torch

BACKENDS = ("auto", "triton", "torch")


def interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors in the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is a Linux-only dependency)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Decide whether a public kernel function runs Triton (True) or the torch reference (False).

    Args:
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.
        tensors: the function's tensor inputs; any CUDA tensor makes ``"auto"`` pick Triton.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    on_cuda = any(t.is_cuda for t in tensors)
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package; install it or use backend='torch'")
        if not on_cuda and not interpret_mode():
            raise RuntimeError(
                "backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is first imported; "
                "or use backend='torch'"
            )
    elif not (triton_available() and (on_cuda or interpret_mode())):
        return False
    if not on_cuda:
        _check_interpreter_ready()
    return True


@functools.cache
def interpreter_incompatibility(triton_version: str, numpy_version: str) -> str | None:
    """Why the Triton CPU interpreter cannot run with these versions, or None when it can.

    NumPy 2.4 made ``int()`` of a one-element 1-D array an error; the interpreters of triton
    before 3.7 call exactly that whenever a kernel uses a runtime integer as a Python index (every
    ``range`` over a tensor dimension here), so every kernel launch would fail deep inside triton.
    """
    if _version_tuple(triton_version) < (3, 7) and _version_tuple(numpy_version) >= (2, 4):
        return (
            f"the Triton CPU interpreter of triton {triton_version} fails with numpy {numpy_version} "
            "(numpy >= 2.4 refuses int() of a 1-element array, which triton < 3.7 relies on); "
            "install triton>=3.7 or numpy<2.4, or use backend='torch'"
        )
    return None


def _version_tuple(version: str) -> tuple[int, ...]:
    # leading numeric components only: "3.6.0+git1234" -> (3, 6, 0), "2.4.0rc1" -> (2, 4)
    parts = []
    for part in version.split("+")[0].split("."):
        if not part.isdigit():
            break
        parts.append(int(part))
    return tuple(parts)


def _check_interpreter_ready() -> None:
    import numpy
    import triton

    problem = interpreter_incompatibility(triton.__version__, numpy.__version__)
    if problem is not None:
        raise RuntimeError(problem)
    language = sys.modules.get("triton.language")
    if language is not None and type(getattr(language, "sum", None)).__name__ == "JITFunction":
        raise RuntimeError(
            "triton was imported before TRITON_INTERPRET=1 was set, so its library functions are bound to "
            "the GPU compiler and cannot run in the CPU interpreter; set TRITON_INTERPRET=1 before the first "
            "`import triton` (for example in the environment of the process)"
        )


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1); block sizes for ``tl.arange`` must be powers of two."""
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division for grid sizes."""
    return -(-a // b)
