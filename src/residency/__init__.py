"""residency: expert residency and offload for NVIDIA Nemotron 3 Super.

Profile which experts a prompt needs, plan how experts split between GPU and host memory for a
target GPU, and run the model with experts offloaded. Public names are imported lazily so that
``import residency`` stays cheap and planning works without loading model code.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "OffloadedNemotron": ".offloaded",
    "NemotronHConfig": ".config",
    "load_config": ".config",
    "Profile": ".profiling.profile",
    "RoutingTrace": ".profiling.trace",
    "Plan": ".planning.plan",
    "plan_residency": ".planning.plan",
    "GpuSpec": ".planning.hardware",
    "HostSpec": ".planning.hardware",
    "ResidencyError": ".errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'residency' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
