"""GPU catalog, name lookup, custom spec files and local detection with fake NVML / psutil / torch."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from residency.planning.hardware import (
    CATALOG,
    DEFAULT_HOST,
    SOURCE_KINDS,
    GiB,
    GpuSpec,
    HardwareError,
    HostSpec,
    detect_local,
    find_gpu,
    load_gpu_spec,
    lookup_gpu,
    pcie_practical_gbps,
    save_gpu_spec,
)

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
    with pytest.raises(HardwareError, match="not a GPU spec"):
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


# ---------------------------------------------------------------------- detection with fakes


class NVMLError(Exception):
    pass


class NVMLNotSupported(NVMLError):
    pass


class FakeNVML:
    """A stand-in for pynvml with configurable answers; a value that is an exception type is raised."""

    NVMLError = NVMLError
    NVML_CLOCK_MEM = 2

    def __init__(self, **answers):
        self.answers = {
            "name": "NVIDIA GeForce RTX 4090", "memory": SimpleNamespace(total=24 * GiB - 300 * 2**20, free=23 * GiB),
            "cc": (8, 9), "max_gen": 4, "max_width": 16, "cur_gen": 1, "cur_width": 16, "count": 1,
            "bus_width": 384, "mem_clock": 10501,
        }
        self.answers.update(answers)
        self.shutdown = False

    def _get(self, key):
        value = self.answers[key]
        if isinstance(value, type) and issubclass(value, Exception):
            raise value("fake")
        return value

    def nvmlInit(self):
        self._get("init") if "init" in self.answers else None

    def nvmlShutdown(self):
        self.shutdown = True

    def nvmlDeviceGetCount(self):
        return self._get("count")

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("handle", i)

    def nvmlDeviceGetName(self, h):
        return self._get("name").encode()

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return self._get("cc")

    def nvmlDeviceGetMemoryInfo(self, h):
        return self._get("memory")

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h):
        return self._get("max_gen")

    def nvmlDeviceGetMaxPcieLinkWidth(self, h):
        return self._get("max_width")

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h):
        return self._get("cur_gen")

    def nvmlDeviceGetCurrPcieLinkWidth(self, h):
        return self._get("cur_width")

    def nvmlDeviceGetMemoryBusWidth(self, h):
        return self._get("bus_width")

    def nvmlDeviceGetMaxClockInfo(self, h, clock):
        return self._get("mem_clock")


class FakePsutil:
    def __init__(self, total=64 * GiB, available=60 * GiB, cores=16):
        self._vm = SimpleNamespace(total=total, available=available)
        self._cores = cores

    def virtual_memory(self):
        return self._vm

    def cpu_count(self, logical=True):
        return self._cores


class FakeTorch:
    def __init__(self, available=True, integrated=False, mem=None):
        self.cuda = SimpleNamespace(
            is_available=lambda: available,
            get_device_properties=lambda i: SimpleNamespace(is_integrated=integrated),
            mem_get_info=lambda i: mem if mem else (_ for _ in ()).throw(RuntimeError("no cuda")),
        )


def test_detect_discrete_gpu_uses_max_link_not_idle_link():
    nvml = FakeNVML()
    det = detect_local(nvml=nvml, psutil_module=FakePsutil(), torch_module=FakeTorch())
    g = det.gpu
    assert g is not None and g.name == "RTX 4090" and not g.unified_memory
    assert g.usable_bytes == 24 * GiB - 300 * 2**20 and det.free_bytes == 23 * GiB
    # Gen1 (idle) would give 3.2 GB/s; the max link Gen4 x16 gives 25.2, capped at the catalog's 25.
    assert g.h2d_gbps == 25.0 and g.link == "PCIe 4.0 x16"
    assert any("maximum negotiated PCIe Gen4 x16" in n for n in det.notes)
    assert det.host.memory_bytes == 64 * GiB and det.host.cpu_cores == 16
    assert nvml.shutdown


def test_detect_narrow_slot_lowers_the_link_estimate():
    det = detect_local(nvml=FakeNVML(max_width=8), psutil_module=FakePsutil(), torch_module=FakeTorch())
    assert det.gpu.h2d_gbps == pytest.approx(pcie_practical_gbps(4, 8)) == pytest.approx(12.6, abs=0.01)
    assert det.gpu.source_of("h2d_gbps").startswith("derived")


def test_detect_gb10_memory_not_supported_uses_host_memory():
    nvml = FakeNVML(name="NVIDIA GB10", memory=NVMLNotSupported, cc=(12, 1), max_gen=1, max_width=1)
    psutil = FakePsutil(total=int(121.7 * GiB), available=100 * GiB, cores=20)
    det = detect_local(nvml=nvml, psutil_module=psutil, torch_module=FakeTorch(integrated=True))
    g = det.gpu
    assert g.name == "DGX Spark" and g.unified_memory and g.h2d_gbps is None
    assert g.usable_bytes == int(121.7 * GiB) and det.free_bytes == 100 * GiB
    assert any("NVML memory info is not supported" in n for n in det.notes)
    assert not any("PCIe Gen1" in n for n in det.notes)  # the fake Gen1 x1 link is ignored
    assert det.host.memory_bytes == int(121.7 * GiB)


def test_detect_integrated_reporting_host_sized_memory():
    nvml = FakeNVML(name="NVIDIA GB10", memory=SimpleNamespace(total=int(121.7 * GiB), free=90 * GiB), cc=(12, 1))
    det = detect_local(nvml=nvml, psutil_module=FakePsutil(total=int(121.7 * GiB)), torch_module=FakeTorch())
    assert det.gpu.unified_memory and any("host-sized memory" in n for n in det.notes)


def test_detect_discrete_memory_unsupported_falls_back_to_torch():
    torch = FakeTorch(mem=(20 * GiB, 24 * GiB))
    det = detect_local(nvml=FakeNVML(memory=NVMLNotSupported), psutil_module=FakePsutil(), torch_module=torch)
    assert not det.gpu.unified_memory and det.gpu.usable_bytes == 24 * GiB
    assert any("MIG slice" in n for n in det.notes)


def test_detect_unknown_gpu_builds_a_spec_from_nvml():
    nvml = FakeNVML(name="NVIDIA Future GPU", cc=(10, 3), max_gen=5, max_width=16, bus_width=512, mem_clock=14000)
    det = detect_local(nvml=nvml, psutil_module=FakePsutil(), torch_module=FakeTorch())
    g = det.gpu
    assert g.name == "NVIDIA Future GPU" and g.fp8 and g.fp4
    assert g.mem_bw_gbps == pytest.approx(2 * 14000e6 * 512 / 8 / 1e9)
    assert g.h2d_gbps == pytest.approx(pcie_practical_gbps(5, 16))
    assert any("not in the catalog" in n for n in det.notes)


def test_detect_without_driver():
    det = detect_local(nvml=FakeNVML(init=NVMLError), psutil_module=FakePsutil(), torch_module=FakeTorch())
    assert det.gpu is None and "NVML unavailable" in det.notes[0]
    det = detect_local(nvml=FakeNVML(count=0), psutil_module=FakePsutil(), torch_module=FakeTorch())
    assert det.gpu is None and "not present" in det.notes[0]
    assert "no NVIDIA GPU" in det.describe()
