"""Where and how a model runs, the same for training, evaluation, `tnt bench` and `tnt ablate`: the device and
its name, autocast precision, and the forward GMACs of one image."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import platform
import time
from pathlib import Path
from typing import Callable, ContextManager

import torch

from tntcli.errors import TntError

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when there is a GPU), `cpu`, `cuda` or `cuda:N`; a device that is not there is a TntError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TntError(f"unknown device '{name}'; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TntError(f"--device {name}: no CUDA GPU is available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise TntError(f"--device {name}: only cpu and cuda are supported")
    return device


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model with its core count and vector ISA."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    # The vector ISA tells apart VMs that share a model name ("AMD EPYC") but run GEMMs at 2x different rates.
    return f"{model} ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], None], device: torch.device, iters: int = 1) -> float:
    """Seconds per call of `fn`, averaged over `iters` calls (the device synchronised around them)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / iters


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the recipe's `train.amp`: auto is bf16 on a GPU and none (fp32) on a CPU."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return AMP_DTYPES[setting]


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    """Autocast to `dtype` on `device`; no autocast for None or float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def count_gmacs(model_cfg) -> float:
    """fvcore forward GMACs of one image through the model `model_cfg` builds (without drop path, which fvcore
    cannot trace and which costs nothing at inference). Built on the CPU; tracer chatter on stderr is dropped."""
    from tntcli.flops import count_macs
    from tntcli.models.registry import build_model

    model = build_model(dataclasses.replace(model_cfg, drop_path_rate=0.0))
    try:
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            return count_macs(model, model_cfg.img_size).total() / 1e9
    except ModuleNotFoundError as err:
        raise TntError(f"counting GMACs needs {err.name} (pip install fvcore)") from None
