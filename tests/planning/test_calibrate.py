"""Calibration: a measured spec is a usable GPU spec; measuring needs CUDA and says so without it."""

from __future__ import annotations

import pytest
import torch

from residency.cli.plan import resolve_config
from residency.planning.calibrate import calibrated_spec, measure
from residency.planning.hardware import HardwareError, load_gpu_spec, lookup_gpu, save_gpu_spec
from residency.planning.plan import plan_residency


def test_calibrated_spec_is_usable_as_gpu_spec(tmp_path):
    spec = calibrated_spec(lookup_gpu("RTX 4090"), h2d_gbps=21.37, device_copy_gbps=870.0, context_bytes=512 << 20)
    assert spec.h2d_gbps == 21.37 and spec.context_bytes == 512 << 20 and spec.mem_bw_gbps == 1008
    assert spec.source_of("h2d_gbps").startswith("measured") and "870 GB/s" in spec.notes
    path = save_gpu_spec(tmp_path / "cal.json", spec)
    assert load_gpu_spec(path) == spec
    unknown = calibrated_spec(spec.replace(note="unverified: guess", mem_bw_gbps=1.0), 20.0, 800.0, 0)
    assert unknown.mem_bw_gbps == 1000.0 and unknown.source_of("mem_bw_gbps").startswith("derived")
    plan = plan_residency(resolve_config("nemotron-3-super", None), load_gpu_spec(path))
    assert plan.breakdown.get("cuda_context") == 512 << 20


def test_measure_without_cuda_says_where_to_run(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(HardwareError, match="no CUDA device is visible.*machine with the GPU"):
        measure()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_measure_on_a_real_gpu():
    result = measure(copy_bytes=64 << 20, repeats=3)
    assert result.h2d_gbps > 1 and result.device_copy_gbps > result.h2d_gbps and result.context_bytes > 0
