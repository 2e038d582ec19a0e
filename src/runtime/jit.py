"""numba compilation with an on-disk cache that any change to the runtime's sources invalidates.

numba keys a cached function on the contents of its own file and its own bytecode. A compiled
function also holds the code of the compiled functions it calls and inlines, and the values of
the globals it reads, as they were when it was compiled: :func:`~residency.runtime.control.layer_call`
inlines the eviction policies of ``policy.py`` and bakes in the telemetry's column numbers, the
quantized CPU kernel inlines row loops of ``cpu_experts.py`` and the E2M1 table of
``kernels/moe/quant_formats.py``. With numba's own key, an edit or an upgrade that changes only
such a file leaves the old compiled code in ``__pycache__`` (numba's files there are not part of
a wheel's record, so installing a new version does not remove them), and it runs: the runtime's
admissions would then differ from the simulator's, which compiles the new policy.

:func:`njit` adds a fingerprint of those sources (:data:`SOURCES_FINGERPRINT`) to every cached
function's key, so such code is compiled again once and cached beside the old entries. Without
numba it returns the function itself (the policies' pure-Python path).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

try:
    import numba
    from numba.core.caching import FunctionCache
except ImportError:  # pragma: no cover - numba is a dependency; the policies also run as plain Python
    numba = None
    FunctionCache = object

HAVE_NUMBA = numba is not None

_RUNTIME = Path(__file__).resolve().parent
#: the files whose code or constants the runtime's compiled functions contain: the runtime's own modules and the
#: quantized formats' tables (``kernels`` is the runtime's sibling both in the source tree and when installed)
SOURCE_FILES = tuple(sorted(_RUNTIME.glob("*.py"))) + (_RUNTIME.parent / "kernels" / "moe" / "quant_formats.py",)


def sources_fingerprint(files: Iterable[Path]) -> str:
    """A hash of the names and contents of ``files`` (one missing is hashed as missing)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        digest.update(path.read_bytes() if path.is_file() else b"<missing>")
        digest.update(b"\0")
    return digest.hexdigest()[:16]


SOURCES_FINGERPRINT = sources_fingerprint(SOURCE_FILES)


class _FingerprintedCache(FunctionCache):  # type: ignore[misc, valid-type]
    """numba's on-disk cache of one function, its index key extended by a sources fingerprint."""

    def __init__(self, py_func: Callable[..., Any], fingerprint: str) -> None:
        super().__init__(py_func)
        self._fingerprint = fingerprint

    def _index_key(self, sig: Any, codegen: Any) -> tuple:
        return (*super()._index_key(sig, codegen), ("residency sources", self._fingerprint))


def njit(fn: Callable[..., Any] | None = None, *, fingerprint: str = SOURCES_FINGERPRINT,
         **options: Any) -> Any:
    """``numba.njit(nogil=True, **options)`` with an on-disk cache keyed also on ``fingerprint``.

    Use as ``@njit`` or ``@njit(parallel=True, ...)``. ``fingerprint`` defaults to the runtime's sources;
    code compiled elsewhere with other dependencies can pass its own (:func:`sources_fingerprint`).
    """
    def build(f: Callable[..., Any]) -> Any:
        if not HAVE_NUMBA:
            return f
        dispatcher = numba.njit(**{"nogil": True, **options})(f)
        dispatcher._cache = _FingerprintedCache(f, fingerprint)  # what numba's cache=True sets, with our key
        return dispatcher

    return build if fn is None else build(fn)
