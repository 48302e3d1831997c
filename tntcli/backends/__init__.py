"""Speed paths for a built model, applied once by the code that runs it (engine, eval, bench, ablate's timer).

The models in `tntcli.models` are the plain math and the reference: what `tnt flops` counts and what the parity
tests compare with. A backend changes how modules compute, never what (the tests hold each path to the
reference's outputs and gradients), by giving modules a subclass whose `forward` takes a faster route:

| backend     | where            | what                                                                      |
|-------------|------------------|---------------------------------------------------------------------------|
| `reference` | anywhere         | nothing: the plain model                                                  |
| `cpu-fast`  | CPU, fp32        | oneDNN linears, the C++ tiny-attention kernel, compiled inner layers (cpu.py) |
| `cpu-eager` | CPU, fp32        | the same without `torch.compile`                                          |
| `cuda`      | CUDA             | chunked inner attention chosen by measured speed (cuda.py)                |
| `auto`      |                  | `cpu-fast` on CPU in fp32, `cuda` on CUDA, otherwise `reference`          |

All but `reference` also compute only the class token in the last layer (the head reads nothing else).
"""
from __future__ import annotations

import torch
from torch import nn

from tntcli.errors import TntError

BACKENDS = ("auto", "reference", "cpu-fast", "cpu-eager", "cuda")


def resolve(name: str, device: torch.device, dtype: torch.dtype | None) -> str:
    """The backend `name` means for a model run on `device` under autocast `dtype` (None: fp32)."""
    if name not in BACKENDS:
        raise TntError(f"unknown backend '{name}'; choose one of: {', '.join(BACKENDS)}")
    if name == "auto":
        if device.type == "cuda":
            return "cuda"
        return "cpu-fast" if device.type == "cpu" and dtype is None else "reference"
    if name.startswith("cpu-") and (device.type != "cpu" or dtype is not None):
        raise TntError(f"backend {name} runs on CPU in fp32, not on {device.type} "
                       f"{'with ' + str(dtype).removeprefix('torch.') + ' autocast' if dtype else ''}".rstrip())
    if name == "cuda" and device.type != "cuda":
        raise TntError(f"backend cuda needs a CUDA device, not {device.type}")
    return name


def apply_backend(model: nn.Module, name: str = "auto", *, device: torch.device | str,
                  dtype: torch.dtype | None = None, training: bool, batch_size: int | None = None) -> str:
    """Give `model` (already on `device`) the speed paths of backend `name`, in place, once; returns the backend
    resolved from `auto`. `training`: the model will be trained; `batch_size` (per process) sizes the choices
    that depend on it (compiling the inner transformer, the CUDA attention timing)."""
    device = torch.device(device)
    resolved = resolve(name, device, dtype)
    if getattr(model, "backend", None) not in (None, "reference"):
        raise TntError(f"the model already runs on backend {model.backend}")
    if resolved in ("cpu-fast", "cpu-eager"):
        from tntcli.backends import cpu

        cpu.apply(model, training=training, batch_size=batch_size,
                  options=cpu.CpuOptions(compile_inner=resolved == "cpu-fast"))
    elif resolved == "cuda":
        from tntcli.backends import cuda

        cuda.apply(model, training=training, batch_size=batch_size, dtype=dtype)
    model.backend = resolved
    return resolved
