"""One training step, shared by the engine, `tnt bench` and `tnt ablate --dry-run`'s step timer, and the EMA it
updates.

    step = TrainStep(net, model, optimizer, autocast=..., scheduler=..., ema=...)
    loss, finite = step(images, targets)         # both stay on the device: no host sync

The step never reads a value back to the host: the caller checks `finite` and logs `loss` when it chooses (the
engine: every `train.log_every` steps). With `skip_non_finite`, a step whose loss is not finite leaves the
weights, the optimiser state and the EMA as they were, by masking on the device (see `_MaskedUpdate`).
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


def adamw(params, device: torch.device, **kwargs: Any) -> torch.optim.AdamW:
    """AdamW, fused into one kernel on CUDA (which also keeps its step counters on the device)."""
    return torch.optim.AdamW(params, fused=True if device.type == "cuda" else None, **kwargs)


class ModelEma:
    """Exponential moving average of a model's parameters and buffers: ema <- decay * ema + (1 - decay) * model
    after every step, the first update copying the model.

    The same arithmetic as torch's `AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay),
    use_buffers=True)` (one `_foreach_lerp_` per device and dtype) and the same `state_dict` keys (`n_averaged`,
    `module.*`), so checkpoints written with either load into the other; but the update count lives on the host,
    where AveragedModel's is a tensor copied to the device (and read back) at every step.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.decay = decay
        self.n_averaged = 0

    def _pairs(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        ours = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        return [t.detach() for t in ours], [t.detach() for t in theirs]

    @torch.no_grad()
    def update(self, model: nn.Module, keep: Tensor | None = None) -> None:
        """One EMA step towards `model`; `keep` (a bool tensor): False leaves the average as it is."""
        ours, theirs = self._pairs(model)
        if self.n_averaged == 0:
            for a, b in zip(ours, theirs):
                a.copy_(b if keep is None else torch.where(keep, b, a))
        else:
            weight = 1 - self.decay if keep is None else keep * (1 - self.decay)   # a tensor weight when masked
            floats = [(a, b) for a, b in zip(ours, theirs) if a.is_floating_point()]
            for a, b in zip(ours, theirs):
                if not a.is_floating_point():                  # counters: follow the model
                    a.copy_(b if keep is None else torch.where(keep, b, a))
            for group in _by_device_and_dtype(floats):
                torch._foreach_lerp_([a for a, _ in group], [b for _, b in group], weight)
        self.n_averaged += 1

    def state_dict(self) -> dict[str, Any]:
        return {"n_averaged": torch.tensor(self.n_averaged), **{f"module.{k}": v for k, v in
                                                                self.module.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n_averaged = int(state["n_averaged"])
        self.module.load_state_dict({k.removeprefix("module."): v for k, v in state.items() if k != "n_averaged"})


def _by_device_and_dtype(pairs: list[tuple[Tensor, Tensor]]) -> list[list[tuple[Tensor, Tensor]]]:
    groups: dict[tuple, list] = {}
    for a, b in pairs:
        groups.setdefault((a.device, a.dtype), []).append((a, b))
    return list(groups.values())


class _MaskedUpdate:
    """Makes an optimiser step conditional on a bool tensor without reading it on the host: the parameters and
    optimiser state are copied before the step and put back where `keep` is False. State the step creates
    (AdamW's first step) is put back to zeros, its initial value. Costs a copy of the weights and optimiser
    state per step, so only `nan_policy: skip` pays it."""

    def __init__(self, optimizer: torch.optim.Optimizer, keep: Tensor):
        self.optimizer, self.keep = optimizer, keep

    def _tensors(self) -> dict[tuple[int, str], Tensor]:
        out = {}
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                out[(id(p), "param")] = p
                for name, value in self.optimizer.state.get(p, {}).items():
                    if isinstance(value, Tensor):
                        out[(id(p), name)] = value
        return out

    def __enter__(self):
        self.before = {key: t.detach().clone() for key, t in self._tensors().items()}
        return self

    @torch.no_grad()
    def __exit__(self, *exc):
        if exc[0] is not None:
            return
        for key, t in self._tensors().items():
            old = self.before.get(key)
            t.copy_(torch.where(self.keep.to(t.device), t, torch.zeros_like(t) if old is None else old))


@dataclass
class TrainStep:
    """forward under autocast -> cross-entropy -> backward -> (clip) -> optimiser -> scheduler -> EMA.

    `net` is what is called (the model, or its DDP / compiled wrapper); `model` the plain module whose weights
    are clipped and averaged. Returns `(loss, finite)`: the fp32 loss () and whether it was finite (), both on
    the device. `images` (B, 3, H, W), `targets` (B,) class indices or (B, classes) soft labels.
    """

    net: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    label_smoothing: float = 0.0
    scaler: torch.amp.GradScaler | None = None
    clip_grad: float | None = None
    scheduler: Any = None
    ema: ModelEma | None = None
    skip_non_finite: bool = False      # nan_policy skip: a non-finite step changes nothing (masked on the device)

    def __call__(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        with self.autocast():
            logits = self.net(images)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
        finite = torch.isfinite(loss.detach())
        if self.skip_non_finite and dist.is_initialized():     # every rank skips the same steps
            agreed = finite.to(torch.int32)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)      # on the device: no host sync
            finite = agreed.bool()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        masked = _MaskedUpdate(self.optimizer, finite) if self.skip_non_finite else contextlib.nullcontext()
        with masked:
            if self.clip_grad:
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model, finite if self.skip_non_finite else None)
        return loss.detach(), finite
