"""The runtime's numba cache (runtime/jit.py): compiled code that holds another file's code is rebuilt when that file
changes, still loads from the cache when nothing changed, and every compiled function of the runtime uses it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numba
import pytest
from numba.core.registry import CPUDispatcher
from residency.runtime import control, cpu_experts, cpu_quant, jit, policy

from residency.planning import simulate

KERNEL = """
from pathlib import Path

from residency.runtime.jit import njit, sources_fingerprint

from .helper import value

FINGERPRINT = sources_fingerprint([Path(__file__).parent / "helper.py"])


@njit(fingerprint=FINGERPRINT)
def kernel():
    return value() + 10
"""

HELPER = """
from residency.runtime.jit import njit


@njit(inline="always")
def value():
    return {value}
"""

RUN = """
import json
import pkg.kernel as k
print(json.dumps({"result": k.kernel(), "cache_hits": sum(k.kernel.stats.cache_hits.values())}))
"""


def _run(root: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("NUMBA_CACHE_DIR", None)
    env.pop("NUMBA_DISABLE_JIT", None)
    done = subprocess.run([sys.executable, "-c", RUN], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_change_to_an_inlined_function_in_another_file_recompiles_and_a_rerun_loads_the_cache(tmp_path):
    """numba alone keys ``kernel`` on kernel.py, which does not change: it would load the old code and return 11."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "kernel.py").write_text(textwrap.dedent(KERNEL))
    (pkg / "helper.py").write_text(textwrap.dedent(HELPER.format(value=1)))
    first = _run(tmp_path)
    assert first == {"result": 11, "cache_hits": 0}
    assert list((pkg / "__pycache__").glob("kernel.kernel-*.nbi")), "the kernel was not cached"
    again = _run(tmp_path)
    assert again == {"result": 11, "cache_hits": 1}  # unchanged sources: loaded, not compiled
    (pkg / "helper.py").write_text(textwrap.dedent(HELPER.format(value=2)))
    changed = _run(tmp_path)
    assert changed == {"result": 12, "cache_hits": 0}
    assert _run(tmp_path) == {"result": 12, "cache_hits": 1}


def test_the_fingerprint_covers_the_runtime_and_the_quantized_tables(tmp_path):
    names = {p.name for p in jit.SOURCE_FILES}
    assert {"policy.py", "control.py", "telemetry.py", "cpu_experts.py", "cpu_quant.py", "jit.py",
            "quant_formats.py"} <= names
    assert all(p.is_file() for p in jit.SOURCE_FILES)
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    before = jit.sources_fingerprint([a, b])
    assert jit.sources_fingerprint([a, b]) == before
    b.write_text("y = 3\n")
    assert jit.sources_fingerprint([a, b]) != before
    assert jit.sources_fingerprint([a, tmp_path / "gone.py"]) != jit.sources_fingerprint([a])


@pytest.mark.parametrize("module", [policy, control, cpu_experts, cpu_quant, simulate], ids=lambda m: m.__name__)
def test_every_compiled_function_is_cached_with_the_fingerprint(module):
    dispatchers = [v for v in vars(module).values() if isinstance(v, CPUDispatcher) and v.__module__ == module.__name__]
    assert dispatchers, f"no compiled functions found in {module.__name__}"
    for d in dispatchers:
        assert isinstance(d._cache, jit._FingerprintedCache), f"{module.__name__}.{d.__name__} bypasses runtime.jit"
        assert d._cache._fingerprint == jit.SOURCES_FINGERPRINT


def test_the_key_of_a_compiled_runtime_function_carries_the_fingerprint():
    control.warm_up()
    sig = control.layer_call.signatures[0]
    key = control.layer_call._cache._index_key(sig, control.layer_call.targetctx.codegen())
    assert key[-1] == ("residency sources", jit.SOURCES_FINGERPRINT)
    assert numba.config.DISABLE_JIT == 0
