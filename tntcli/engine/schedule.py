"""The learning-rate schedule: linear warm-up, a cosine down to min_lr, then cooldown epochs held at min_lr.

It is timm's `CosineLRScheduler` as the official TNT run used it (timm 0.3.2's `create_scheduler` for
`--sched cosine`: t_initial = `--epochs`, no warm-up prefix, one cycle, lr set once per epoch), with one
difference in counting: our `train.epochs` is every epoch that runs, cooldown included. timm's train.py ran
`--epochs 300` plus its default `--cooldown-epochs 10`, 310 epochs in all; our ImageNet recipes say
`epochs: 310, cooldown_epochs: 10` for the same run.

With `t` in epochs since the start (an integer once per epoch, or fractional with `optim.sched_on_updates`),
`W` the warm-up epochs, `C` the cooldown epochs and `T = epochs - C` the epochs under the cosine:

    lr(t) = warmup_lr + (lr - warmup_lr) * t / W              t < W
          = min_lr + (lr - min_lr) * (1 + cos(pi * t / T)) / 2  W <= t < T   (the warm-up is inside the cosine)
          = min_lr                                             t >= T
"""
from __future__ import annotations

import math

import torch

from tntcli.config import RunConfig


def schedule_epochs(cfg: RunConfig) -> tuple[int, int]:
    """(warm-up epochs, cosine epochs T) of a run; runs shorter than warm-up + cooldown keep >= 1 cosine epoch."""
    epochs = cfg.train.epochs
    warmup = min(cfg.optim.warmup_epochs, epochs - 1)
    cooldown = min(cfg.optim.cooldown_epochs, epochs - warmup - 1)
    return warmup, epochs - cooldown


def lr_factor(t: float, *, warmup: int, cosine: int, start: float, floor: float) -> float:
    """lr(t) / lr for `t` epochs since the start (the formula in the module docstring, divided by the peak lr)."""
    if t < warmup:
        return start + (1 - start) * t / warmup
    if t < cosine:
        return floor + (1 - floor) * (1 + math.cos(math.pi * t / cosine)) / 2
    return floor


def build_scheduler(opt: torch.optim.Optimizer, cfg: RunConfig, lr: float, steps_per_epoch: int):
    """A LambdaLR stepped once per optimiser step; the lr changes once per epoch unless `optim.sched_on_updates`.

    One multiplier for every param group, so groups keep their lr ratios under layer-wise decay or a scaled
    backbone lr (timm's `lr_scale` does the same). warmup_lr and min_lr are capped at the peak `lr`.
    """
    o = cfg.optim
    warmup, cosine = schedule_epochs(cfg)
    shape = dict(warmup=warmup, cosine=cosine, start=min(1.0, o.warmup_lr / lr), floor=min(1.0, o.min_lr / lr))

    def factor(step: int) -> float:
        t = step / steps_per_epoch if o.sched_on_updates else step // steps_per_epoch
        return lr_factor(t, **shape)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def last_step_lr(sched: torch.optim.lr_scheduler.LambdaLR) -> float:
    """The rate of param group 0 at the optimiser step last taken (the scheduler has moved past it already)."""
    return sched.base_lrs[0] * sched.lr_lambdas[0](max(sched.last_epoch - 1, 0))
