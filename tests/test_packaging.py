"""The package layout: sub-packages install under ``residency`` only, and the public surface imports."""

from __future__ import annotations

import importlib
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_source_package_is_listed():
    tomllib = pytest.importorskip("tomllib")
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapping = cfg["package-dir"]
    found = set()
    for name, folder in mapping.items():
        base = ROOT / folder
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            found.add(".".join((name, *rel)) if rel else name)
    assert found <= listed, f"add these packages to pyproject.toml: {sorted(found - listed)}"


def test_no_top_level_kernels_or_runtime_package():
    for name in ("kernels", "runtime"):
        spec = importlib.util.find_spec(name)
        assert spec is None or "residency" not in str(spec.origin or ""), name


def test_public_surface():
    import residency

    for name in ("OffloadedNemotron", "NemotronHConfig", "RoutingTrace", "ResidencyError"):
        assert getattr(residency, name) is not None
    assert importlib.import_module("residency.runtime").__name__ == "residency.runtime"
    assert importlib.import_module("residency.kernels").__name__ == "residency.kernels"
    from residency.testing import write_tiny_checkpoint

    assert callable(write_tiny_checkpoint)
