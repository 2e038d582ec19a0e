"""Which device residency runs on: one place that turns ``None``, ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a
``torch.device`` into a checked ``torch.device``, or refuses it with :class:`DeviceError` naming the fix."""

from __future__ import annotations

import torch

from .errors import DeviceError

__all__ = ["SUPPORTED_DEVICES", "DeviceError", "resolve_device"]

SUPPORTED_DEVICES = ("cpu", "cuda", "unified")
_SUPPORTED_TEXT = (
    "residency runs on 'cpu', 'cuda' (also 'cuda:N') or 'unified' (DGX Spark, GH200-class machines)"
)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to run on.

    ``None`` picks ``cuda`` when a CUDA GPU is usable, else ``cpu``; so does ``"unified"`` (the
    offload runtime then reads experts in place from the shared memory pool). ``"cuda"`` and ``"cuda:N"`` are
    checked for availability and index range and come back with their index (``cuda:0`` …).
    Anything else raises :class:`~residency.errors.DeviceError` listing the supported devices.
    """
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device, str):
        text = device.strip().lower()
        if text == "unified":  # a unified-memory machine: its GPU, or the CPU where there is none
            return resolve_device(None)
        try:
            dev = torch.device(text)
        except RuntimeError:
            raise DeviceError(f"unknown device {device!r}; {_SUPPORTED_TEXT}") from None
    elif isinstance(device, torch.device):
        dev = device
    else:
        raise DeviceError(f"device must be a string such as 'cuda:0' or a torch.device, got {device!r}; "
                          f"{_SUPPORTED_TEXT}")
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        return _check_cuda(dev)
    raise DeviceError(f"unsupported device {str(dev)!r}; {_SUPPORTED_TEXT}")


def _check_cuda(dev: torch.device) -> torch.device:
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = f"this torch build ({torch.__version__}) has no CUDA support; install a CUDA build of torch"
        else:
            why = "no CUDA GPU is visible (check the driver with nvidia-smi, and CUDA_VISIBLE_DEVICES)"
        raise DeviceError(f"device {str(dev)!r} requested but CUDA is not available: {why}, or use device 'cpu'")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < count:
        valid = "'cuda:0'" if count == 1 else f"'cuda:0' to 'cuda:{count - 1}'"
        raise DeviceError(f"device {str(dev)!r} does not exist: this machine has {count} CUDA device(s), "
                          f"{valid}; pick one of them")
    return torch.device("cuda", index)
