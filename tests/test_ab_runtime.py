"""``benchmarks/ab_runtime.py``: two revisions of the package side by side in one process."""

from __future__ import annotations

import importlib
import sys

import pytest


def test_absolute_imports_of_the_package_are_renamed_and_nothing_else(load_benchmark):
    ab = load_benchmark("ab_runtime")
    text = ("from residency.kernels.moe import x\nimport residency.runtime.control as c\nfrom residency import errors\n"
            "import residency\nfrom residency_other import y\nname = 'residency.runtime'\n")
    assert ab.rename_imports(text, "pkg_b") == (
        "from pkg_b.kernels.moe import x\nimport pkg_b.runtime.control as c\nfrom pkg_b import errors\n"
        "import pkg_b\nfrom residency_other import y\nname = 'residency.runtime'\n")


def test_the_working_tree_becomes_a_package_of_its_own_beside_the_installed_one(load_benchmark, tmp_path,
                                                                                 monkeypatch):
    """The copy is laid out as installed (runtime and kernels inside), imports nothing of ``residency``, and its
    modules are its own: stubbing a kernel in one side leaves the other side and the installed package alone."""
    ab = load_benchmark("ab_runtime")
    target = ab.make_package(ab.sources(None, tmp_path / "src"), "residency_ab_probe", tmp_path / "pkg")
    assert (target / "runtime" / "backend.py").is_file() and (target / "kernels" / "moe").is_dir()
    assert not list(target.rglob("__pycache__"))
    for path in target.rglob("*.py"):
        assert ab.rename_imports(path.read_text(), "residency_ab_probe") == path.read_text(), path
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    try:
        probe = ab.load("residency_ab_probe")
        import residency.runtime.backend as installed

        assert probe.backend is not installed and probe.backend.__file__.startswith(str(target))
        assert probe.backend.control is probe.control and probe.cpu_experts.__name__.startswith("residency_ab_probe.")
        probe.backend.moe_gather_gemm = None
        assert installed.moe_gather_gemm is not None
    finally:
        for name in [m for m in sys.modules if m == "residency_ab_probe" or m.startswith("residency_ab_probe.")]:
            del sys.modules[name]
        importlib.invalidate_caches()


@pytest.mark.parametrize("text, want", [("64", (64, False, False)), ("64:prefetch", (64, True, False)),
                                        ("0:cpu", (0, False, True)), ("256:cpu:prefetch", (256, True, True))])
def test_cases_are_slots_and_flags(load_benchmark, text, want):
    assert load_benchmark("ab_runtime").parse_case(text) == want


def test_a_bad_case_is_refused_with_the_syntax(load_benchmark):
    with pytest.raises(SystemExit, match=r"SLOTS\[:prefetch\]\[:cpu\]"):
        load_benchmark("ab_runtime").parse_case("64:fast")
