"""Device resolution: defaults, checks for CUDA and its index range, refusal of unsupported devices."""

from __future__ import annotations

import pytest
import torch

from residency.devices import resolve_device
from residency.errors import DeviceError, ResidencyError

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cpu_spellings():
    for device in ("cpu", " CPU ", torch.device("cpu"), "cpu:0"):
        assert resolve_device(device) == torch.device("cpu")


@no_cuda
def test_default_is_cpu_without_cuda():
    assert resolve_device(None) == torch.device("cpu")


@needs_cuda
def test_default_and_cuda_get_an_index():
    assert resolve_device(None).type == "cuda" and resolve_device(None).index is not None
    assert resolve_device("cuda") == torch.device("cuda", torch.cuda.current_device())
    count = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=f"has {count} CUDA device"):
        resolve_device(f"cuda:{count}")


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3", torch.device("cuda")])
def test_cuda_without_cuda_is_refused(device):
    with pytest.raises(DeviceError, match="CUDA is not available.*use device 'cpu'"):
        resolve_device(device)


@pytest.mark.parametrize(
    "device, message",
    [
        ("mps", r"unsupported device 'mps'; residency runs on 'cpu', 'cuda'.*or 'unified'"),
        (torch.device("meta"), "unsupported device 'meta'"),
        ("gpu", r"unknown device 'gpu'; residency runs on 'cpu', 'cuda'"),
        ("cuda:x", "unknown device 'cuda:x'"),
        (0, "device must be a string such as 'cuda:0'"),
    ],
)
def test_unsupported_devices_are_refused(device, message):
    with pytest.raises(DeviceError, match=message) as info:
        resolve_device(device)
    assert isinstance(info.value, ResidencyError) and "\n" not in str(info.value)


def test_unified_is_this_machine_s_gpu_or_cpu():
    assert resolve_device("unified") == resolve_device(None)


def test_from_pretrained_checks_the_device_first(tmp_path):
    from residency import OffloadedNemotron

    # the folder does not exist: the device is refused before the folder is looked at
    with pytest.raises(DeviceError, match="unsupported device 'mps'"):
        OffloadedNemotron.from_pretrained(tmp_path / "missing", device="mps")
