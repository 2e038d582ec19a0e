"""GPU catalog (a JSON data file), name lookup and custom spec files."""

from __future__ import annotations

import json

import pytest

from residency.planning.hardware import (
    CATALOG,
    DEFAULT_HOST,
    SOURCE_KINDS,
    GpuSpec,
    HardwareError,
    HostSpec,
    find_gpu,
    load_catalog,
    load_gpu_spec,
    lookup_gpu,
    save_gpu_spec,
)
from residency.sizes import GiB

REQUIRED = [
    "RTX 3090", "RTX 4090", "RTX 5090", "RTX 6000 Ada", "RTX PRO 6000 Blackwell", "L4", "L40S", "A10G",
    "A100 40GB", "A100 80GB PCIe", "A100 80GB SXM", "H100 PCIe", "H100 SXM", "H200", "B200", "GH200", "DGX Spark",
    "Jetson AGX Thor",
]


# ---------------------------------------------------------------------- catalog


def test_catalog_has_every_required_target():
    names = {g.name for g in CATALOG}
    assert set(REQUIRED) <= names


@pytest.mark.parametrize("gpu", CATALOG, ids=lambda g: g.name)
def test_every_catalog_figure_has_a_source(gpu: GpuSpec):
    needed = ["memory_bytes", "mem_bw_gbps", "h2d_gbps", "compute_capability", "fp8", "fp4"]
    if gpu.bf16_tflops is not None:
        needed.append("bf16_tflops")
    if gpu.usable_memory_bytes is not None:
        needed.append("usable_memory_bytes")
    for name in needed:
        note = gpu.source_of(name)
        assert note.split(":")[0] in SOURCE_KINDS[:4], f"{gpu.name}.{name}: {note!r}"
    if gpu.host is not None:
        for name in ("memory_bytes", "cpu_bw_gbps", "disk_gbps"):
            assert gpu.host.sources[name].split(":")[0] in SOURCE_KINDS[:4]


def test_catalog_figures_from_the_reference():
    g = lookup_gpu("RTX 4090")
    assert (g.memory_bytes, g.mem_bw_gbps, g.h2d_gbps, g.compute_capability) == (24 * GiB, 1008, 25.0, (8, 9))
    assert g.fp8 and not g.fp4 and not g.unified_memory
    spark = lookup_gpu("DGX Spark")
    assert spark.unified_memory and spark.h2d_gbps is None and spark.fp4 and spark.compute_capability == (12, 1)
    assert spark.usable_bytes == int(121.7 * GiB) and spark.host is not None
    assert lookup_gpu("RTX 5090").h2d_gbps == 56.3 and lookup_gpu("RTX 5090").source_of("h2d_gbps").startswith("meas")
    assert lookup_gpu("H100 PCIe").source_of("h2d_gbps").startswith("unverified")
    assert lookup_gpu("GH200").h2d_gbps == 346.0 and lookup_gpu("GH200").host.memory_bytes == 480 * GiB


def test_a_spec_rejects_unsourced_kinds_and_missing_link():
    with pytest.raises(HardwareError, match="source of"):
        lookup_gpu("L4").replace(note="guess: maybe", mem_bw_gbps=1.0)
    with pytest.raises(HardwareError, match="h2d_gbps"):
        GpuSpec("x", GiB, 100.0, None, "PCIe", False, (8, 0), False, False)


# ---------------------------------------------------------------------- lookup


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("4090", "RTX 4090"), ("rtx-4090", "RTX 4090"), ("RTX 4090", "RTX 4090"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("H100 PCIe", "H100 PCIe"), ("h100-pcie", "H100 PCIe"),
        ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("spark", "DGX Spark"), ("gb10", "DGX Spark"),
        ("NVIDIA GB10", "DGX Spark"), ("l4", "L4"), ("L40S", "L40S"), ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"),
        ("NVIDIA RTX PRO 6000 Blackwell Workstation Edition", "RTX PRO 6000 Blackwell"), ("thor", "Jetson AGX Thor"),
        ("NVIDIA RTX 6000 Ada Generation", "RTX 6000 Ada"), ("a10g", "A10G"),
    ],
)
def test_name_lookup(query: str, name: str):
    assert lookup_gpu(query).name == name


def test_ambiguous_and_unknown_names_explain_themselves():
    with pytest.raises(HardwareError, match="ambiguous.*H100 PCIe.*H100 SXM"):
        lookup_gpu("H100")
    with pytest.raises(HardwareError, match="Did you mean 'RTX 5090'"):
        lookup_gpu("RTX 5099")
    with pytest.raises(HardwareError, match="residency gpus"):
        lookup_gpu("quantum accelerator")
    assert find_gpu("H100") is None


# ---------------------------------------------------------------------- custom specs


def test_custom_spec_file_full_and_based(tmp_path):
    full = {
        "name": "lab card", "memory_bytes": "20GiB", "mem_bw_gbps": 800, "h2d_gbps": 12.5, "link": "PCIe 4.0 x8",
        "unified_memory": False, "compute_capability": "8.9", "fp8": True, "fp4": False,
    }
    path = tmp_path / "lab.json"
    path.write_text(json.dumps(full))
    spec = load_gpu_spec(path)
    assert spec.memory_bytes == 20 * GiB and spec.compute_capability == (8, 9)
    assert spec.source_of("h2d_gbps") == "user: lab.json"

    based = tmp_path / "slot.json"
    based.write_text(json.dumps({"base": "RTX 4090", "h2d_gbps": 12.6, "name": "RTX 4090 (x8 slot)"}))
    spec = load_gpu_spec(based)
    assert spec.h2d_gbps == 12.6 and spec.mem_bw_gbps == 1008 and spec.name == "RTX 4090 (x8 slot)"
    assert spec.source_of("h2d_gbps").startswith("user") and spec.source_of("mem_bw_gbps").startswith("spec")


def test_custom_spec_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"base": "RTX 4090", "vram": "20GiB"}))
    with pytest.raises(HardwareError, match="unknown field.*vram"):
        load_gpu_spec(bad)
    bad.write_text("{not json")
    with pytest.raises(HardwareError, match="not valid JSON"):
        load_gpu_spec(bad)
    bad.write_text(json.dumps({"kind": "plan"}))
    with pytest.raises(HardwareError, match="is a residency plan .*for a GPU spec, pass a file written by"):
        load_gpu_spec(bad)
    with pytest.raises(HardwareError, match="no such GPU spec"):
        load_gpu_spec(tmp_path / "missing.json")


def test_spec_save_load_round_trip(tmp_path):
    for gpu in (lookup_gpu("GH200"), lookup_gpu("DGX Spark"), lookup_gpu("L4")):
        path = save_gpu_spec(tmp_path / f"{gpu.name}.json", gpu)
        assert load_gpu_spec(path) == gpu
    assert HostSpec.from_dict(DEFAULT_HOST.to_dict()) == DEFAULT_HOST


def test_host_usable_keeps_a_reserve():
    assert HostSpec(memory_bytes=64 * GiB).usable_bytes == 56 * GiB
    assert HostSpec(memory_bytes=256 * GiB).usable_bytes == int(256 * GiB - 256 * GiB // 10)
    assert HostSpec(memory_bytes=64 * GiB, reserve_bytes=GiB).usable_bytes == 63 * GiB


def test_a_spec_file_missing_fields_names_them_and_the_fix(tmp_path):
    path = tmp_path / "partial.json"
    path.write_text(json.dumps({"name": "lab card", "memory_bytes": "20GiB", "mem_bw_gbps": 800}))
    with pytest.raises(HardwareError) as err:
        load_gpu_spec(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert "missing field(s) h2d_gbps, link, unified_memory, compute_capability, fp8, fp4" in msg
    assert '"base": "RTX 4090"' in msg  # the fix: start from a catalog entry


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mem_bw_gbps": "fast"}, "mem_bw_gbps must be a number, got 'fast'"),
        ({"fp8": "yes"}, "fp8 must be true or false"),
        ({"memory_bytes": "20"}, "write 20GiB or 20GB"),
        ({"memory_bytes": "0.8"}, "write 0.8GiB or 0.8GB"),
        ({"memory_bytes": 24}, 'would be 24 bytes; write a size such as "24GiB"'),
        ({"memory_bytes": "20 gigs"}, "unknown unit 'gigs'"),
        ({"compute_capability": "eight"}, "compute_capability must be like [8, 9]"),
        ({"aliases": "lab"}, "aliases must be a list of names"),
        ({"host": "big"}, "host must be an object"),
    ],
)
def test_a_spec_file_with_wrong_values_says_which(tmp_path, change, message):
    full = {"name": "lab card", "memory_bytes": "20GiB", "mem_bw_gbps": 800, "h2d_gbps": 12.5, "link": "PCIe",
            "unified_memory": False, "compute_capability": "8.9", "fp8": True, "fp4": False}
    path = tmp_path / "lab.json"
    path.write_text(json.dumps({**full, **change}))
    with pytest.raises(HardwareError, match=message.replace("[", r"\[").replace("]", r"\]")) as err:
        load_gpu_spec(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_a_spec_file_of_another_kind_says_what_it_is(tmp_path):
    from residency.cli.plan import resolve_config
    from residency.planning.plan import plan_residency
    from residency.planning.simulate import synthetic_trace

    config = resolve_config("nemotron-3-super", None)
    plan = plan_residency(config, "RTX 4090").save(tmp_path / "plan.json")
    with pytest.raises(HardwareError, match="is a residency plan .*use it with `residency simulate --plan`"):
        load_gpu_spec(plan)
    trace = synthetic_trace(config, 4).save(tmp_path / "t.safetensors")
    with pytest.raises(HardwareError, match="is a routing trace .*pass it as --trace.*residency calibrate --out"):
        load_gpu_spec(trace)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    with pytest.raises(HardwareError, match="model config.json .*pass it as --config"):
        load_gpu_spec(tmp_path / "config.json")
    based = tmp_path / "based.json"
    based.write_text(json.dumps({"base": "RTX 9999"}))
    with pytest.raises(HardwareError, match="based.json: base: unknown GPU 'RTX 9999'"):
        load_gpu_spec(based)


# ---------------------------------------------------------------------- the catalog file


def test_catalog_is_package_data_with_a_source_per_figure():
    import importlib.resources

    raw = json.loads((importlib.resources.files("residency") / "data" / "gpus.json").read_text())
    assert raw["kind"] == "gpu_catalog" and [g["name"] for g in raw["gpus"]] == [g.name for g in CATALOG]
    for entry in raw["gpus"]:
        figures = {k for k, v in entry.items() if k not in ("name", "aliases", "link", "notes", "host", "sources")
                   and v is not None and k != "unified_memory"}
        assert figures <= set(entry["sources"]), entry["name"]
    assert load_catalog() == (CATALOG, DEFAULT_HOST)


def test_a_broken_catalog_file_is_refused(tmp_path):
    path = tmp_path / "gpus.json"
    path.write_text('{"kind": "gpu_catalog"')
    with pytest.raises(HardwareError, match="not valid JSON"):
        load_catalog(path)
    path.write_text(json.dumps({"kind": "gpu_catalog", "format_version": 1, "default_host": {}, "hosts": {},
                                "gpus": [{**lookup_gpu("GH200").to_dict(), "host": "grace"}]}))
    with pytest.raises(HardwareError, match="host 'grace' is not in hosts"):
        load_catalog(path)
    l4 = lookup_gpu("L4").to_dict()
    for doc, message in [
        ({"kind": "plan", "format_version": 1}, "not a GPU catalog"),
        ({"kind": "gpu_catalog", "format_version": 2}, "GPU catalog format 2 is not 1; reinstall residency"),
        ({"kind": "gpu_catalog", "format_version": 1, "default_host": DEFAULT_HOST.to_dict(), "gpus": [l4, l4]},
         r"GPU names repeat: \['L4'\]"),
    ]:
        path.write_text(json.dumps(doc))
        with pytest.raises(HardwareError, match=message):
            load_catalog(path)


def test_planning_imports_point_one_way():
    """No import cycles among the planning modules (hardware <-> memory used to import each other)."""
    import ast
    import pathlib

    import residency.planning as planning

    folder = pathlib.Path(planning.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                deps.add(node.module.split(".")[0])
        graph[path.stem] = deps
    assert "memory" not in graph["hardware"] and "detect" not in graph["hardware"]

    def visit(name, stack):
        assert name not in stack, f"import cycle: {' -> '.join([*stack, name])}"
        for dep in graph.get(name, ()):
            visit(dep, [*stack, name])

    for name in graph:
        visit(name, [])
    sizes = pathlib.Path(planning.__file__).parents[1] / "sizes.py"
    leaf = [n for n in ast.walk(ast.parse(sizes.read_text())) if isinstance(n, ast.ImportFrom) and n.level]
    assert [n.module for n in leaf] == ["errors"]  # sizes is a leaf: only the error types
