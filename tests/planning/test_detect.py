"""Local detection with fake NVML / psutil / torch: GB10 unified memory, idle PCIe links, MIG fallbacks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from residency.planning.detect import detect_local, pcie_practical_gbps
from residency.sizes import GiB


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
