from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda:N`` must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but CUDA is not available here; use --set device=cpu")
    return dev


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` does bf16 arithmetic in hardware (otherwise bf16 autocast is emulated and slower)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return bool(cpu_bf16_units())
    return False


def cpu_bf16_units() -> str:
    """The CPU's bf16 units as torch sees them, e.g. "AMX + AVX-512 BF16" ("" for none): AMX tiles (a matrix unit)
    and AVX-512 BF16 (vector dot products); the fast mode's speed-up depends on which one oneDNN can use."""
    units = [name for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX-512 BF16", "_is_avx512_bf16_supported"))
             if getattr(torch.cpu, probe, lambda: False)()]
    return " + ".join(units)


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """``precision`` (auto | fp32 | bf16) -> the autocast dtype, None for plain fp32."""
    if precision == "fp32" or (precision == "auto" and not bf16_native(device)):
        return None
    return torch.bfloat16


def owned_cores() -> int:
    """The cores this process may run on (its affinity mask; a container's CPU set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g
