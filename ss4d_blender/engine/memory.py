"""Device choice, precision defaults, offloading policy and out-of-memory reporting."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .errors import DeviceOutOfMemory, SS4DError

# below this much accelerator memory the stages are loaded one at a time and freed after use
OFFLOAD_BELOW_GB = 24.0


def pick_device(name: str = "auto") -> torch.device:
    """auto | cpu | cuda | cuda:N | mps -> torch.device (a clear error when not available)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SS4DError("CUDA was requested but this PyTorch has no working CUDA device. Choose 'cpu' or "
                        "install the CUDA build of PyTorch (see the README).")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SS4DError(f"There is no CUDA device {device.index} (found {torch.cuda.device_count()}).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SS4DError("Apple MPS was requested but is not available on this machine.")
    return device


def device_memory_gb(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    return None


def default_precision(device: torch.device, precision: str = "auto") -> str:
    """'auto': fp16 on GPUs (CUDA, MPS), fp32 on the CPU. fp16, not bf16: the released checkpoints run
    their blocks in fp16 in the reference (`use_fp16`), and on the parity fixtures fp16 stays ~8x closer to
    the reference's float32 output than bf16 (rel. L2 ~9e-4 vs ~7e-3, bench/precision.py)."""
    if precision != "auto":
        return precision
    return "fp16" if device.type in ("cuda", "mps") else "fp32"


def should_offload(device: torch.device, low_vram: Optional[bool] = None) -> bool:
    if low_vram is not None:
        return bool(low_vram)
    memory = device_memory_gb(device)
    if memory is None:
        return device.type == "mps"  # unified memory: keep the peak low
    return memory < OFFLOAD_BELOW_GB


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, getattr(torch, "OutOfMemoryError", ())):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


@contextlib.contextmanager
def out_of_memory_as_error(stage: str, device: torch.device):
    """Turns an accelerator OOM inside a stage into DeviceOutOfMemory with what to lower."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised unless it is an OOM
        if not is_out_of_memory(err):
            raise
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise DeviceOutOfMemory(
            f"The {device.type.upper()} ran out of memory while {stage.lower()}. Try fewer frames, enable "
            f"'Low VRAM' (load one model at a time), choose a lower precision (fp16/bf16), or use the CPU."
        ) from err
