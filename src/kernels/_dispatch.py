"""Choice between a Triton kernel and its torch reference.

Rules (the same for every public kernel function):

- ``backend=None`` (the default): the library-wide setting, :func:`get_backend` — set in Python
  with :func:`set_backend` or the :func:`kernel_backend` context manager, else read from the
  ``RESIDENCY_KERNELS`` environment variable (``auto``, ``torch`` or ``triton``), else ``auto``.
  The model computes through these functions, so the setting decides what the whole model runs.
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

import contextlib
import functools
import importlib.util
import os
import sys
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "triton", "torch")
BACKEND_ENV = "RESIDENCY_KERNELS"
_backend_setting: str | None = None


def set_backend(backend: str | None) -> None:
    """Set the kernel backend for the whole library (``"auto"``, ``"torch"``, ``"triton"``).

    ``None`` clears the Python setting, so ``RESIDENCY_KERNELS`` (or ``auto``) applies again.
    """
    global _backend_setting
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS} or None, got {backend!r}")
    _backend_setting = backend


def get_backend() -> str:
    """The library-wide kernel backend: the Python setting, else ``RESIDENCY_KERNELS``, else ``"auto"``."""
    if _backend_setting is not None:
        return _backend_setting
    value = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(
            f"{BACKEND_ENV}={os.environ[BACKEND_ENV]!r} is not a kernel backend; set it to one of {', '.join(BACKENDS)}"
        )
    return value


@contextlib.contextmanager
def kernel_backend(backend: str | None) -> Iterator[None]:
    """Run a block with another library-wide kernel backend, then restore the previous setting."""
    global _backend_setting
    previous = _backend_setting
    set_backend(backend)
    try:
        yield
    finally:
        _backend_setting = previous


def interpret_mode() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors in the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is a Linux-only dependency)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(backend: str | None, *tensors: torch.Tensor) -> bool:
    """Decide whether a public kernel function runs Triton (True) or the torch reference (False).

    Args:
        backend: ``"auto"``, ``"triton"``, ``"torch"``, or None for the library-wide setting.
        tensors: the function's tensor inputs; any CUDA tensor makes ``"auto"`` pick Triton.
    """
    if backend is None:
        backend = get_backend()
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
