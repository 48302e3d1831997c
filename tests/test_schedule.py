"""The lr schedule against timm's CosineLRScheduler, set up as the official TNT run's timm 0.3.2 `create_scheduler`
did for `--sched cosine --epochs 300 --warmup-epochs 5 --warmup-lr 1e-6` with timm's defaults `--min-lr 1e-5
--cooldown-epochs 10` (t_initial = 300, warmup_t = 5, no warm-up prefix, one cycle, lr set per epoch), and
timm's train.py loop: `for epoch in range(300 + 10)`, `lr_scheduler.step(epoch + 1)` after each epoch."""
from __future__ import annotations

import pytest
import torch
from timm.scheduler import CosineLRScheduler

from tntcli.config import build_config, load_recipe
from tntcli.engine.schedule import build_scheduler

STEPS_PER_EPOCH = 1251          # ImageNet-1k at the global batch 1024: 1,281,167 // 1024


def timm_epoch_lrs(epochs: int, *, lr: float, warmup_lr: float, warmup: int, min_lr: float, cooldown: int):
    """The lr of each epoch under timm: the oracle (timm's train.py sets it at each epoch's end for the next)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = CosineLRScheduler(opt, t_initial=epochs - cooldown, lr_min=min_lr, warmup_t=warmup,
                              warmup_lr_init=warmup_lr, cycle_limit=1, t_in_epochs=True)
    lrs = []
    for epoch in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step(epoch + 1)
    return lrs


def ours_at(cfg, lr: float, steps_per_epoch: int):
    """Our lr at any global step (the LambdaLR's multiplier, as stepped once per optimiser step)."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_scheduler(opt, cfg, lr, steps_per_epoch)
    return lambda step: lr * sched.lr_lambdas[0](step)


@pytest.fixture(scope="module")
def tnt_s():
    cfg = build_config(load_recipe("tnt-s-imagenet"), {"data.data": "imagenet"})
    lr = cfg.optim.lr * 1024 / cfg.optim.lr_ref_batch                   # 8 GPUs x 128, as the recipe assumes
    oracle = timm_epoch_lrs(cfg.train.epochs, lr=lr, warmup_lr=cfg.optim.warmup_lr, warmup=cfg.optim.warmup_epochs,
                            min_lr=cfg.optim.min_lr, cooldown=cfg.optim.cooldown_epochs)
    return cfg, ours_at(cfg, lr, STEPS_PER_EPOCH), oracle


def test_the_tnt_s_recipe_is_the_official_runs_310_epochs():
    cfg = build_config(load_recipe("tnt-s-imagenet"), {"data.data": "imagenet"})
    o = cfg.optim
    assert (cfg.train.epochs, o.cooldown_epochs, o.warmup_epochs, o.sched_on_updates) == (310, 10, 5, False)
    assert (o.lr, o.lr_ref_batch, o.warmup_lr, o.min_lr) == (1e-3, 1024, 1e-6, 1e-5)


# epoch (0-based): what the official run had there
LANDMARKS = {0: "warm-up start (warmup_lr)", 4: "last warm-up epoch", 5: "warm-up end: first cosine epoch",
             150: "mid-cosine", 299: "cosine end", 300: "first cooldown epoch", 309: "last cooldown epoch"}


@pytest.mark.parametrize("epoch", list(LANDMARKS))
def test_tnt_s_lr_equals_timms_through_the_whole_epoch(tnt_s, epoch):
    _, ours, oracle = tnt_s
    first, last = epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH - 1
    assert ours(first) == pytest.approx(oracle[epoch], rel=1e-12, abs=0), LANDMARKS[epoch]
    assert ours(last) == ours(first)                                   # timm sets it once per epoch


def test_tnt_s_lr_equals_timms_at_every_epoch(tnt_s):
    cfg, ours, oracle = tnt_s
    assert len(oracle) == 310
    assert [ours(e * STEPS_PER_EPOCH) for e in range(310)] == pytest.approx(oracle, rel=1e-12, abs=0)
    assert oracle[0] == 1e-6 and oracle[300:] == [1e-5] * 10 and oracle[299] > 1e-5


def test_the_engines_stepping_gives_the_same_lrs_as_the_multiplier():
    """The LambdaLR as the engine steps it (once after each optimiser step), on a short run of 3 steps per epoch."""
    cfg = build_config({"data": {"data": "digits"}, "train": {"epochs": 12},
                        "optim": {"warmup_epochs": 2, "cooldown_epochs": 3, "lr": 1e-3}})
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = build_scheduler(opt, cfg, 1e-3, 3)
    seen = []
    for _ in range(12 * 3):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    oracle = timm_epoch_lrs(12, lr=1e-3, warmup_lr=1e-6, warmup=2, min_lr=1e-5, cooldown=3)
    assert seen == pytest.approx([lr for lr in oracle for _ in range(3)], rel=1e-12, abs=0)


def test_sched_on_updates_equals_timms_per_update_schedule():
    """`optim.sched_on_updates` (the quickstart): timm's t_in_epochs=False with everything counted in updates."""
    cfg = build_config(load_recipe("quickstart"), {"train.epochs": 4})
    steps, lr = 7, 2e-3
    ours = ours_at(cfg, lr, steps)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = CosineLRScheduler(opt, t_initial=4 * steps, lr_min=cfg.optim.min_lr, warmup_t=cfg.optim.warmup_epochs * steps,
                              warmup_lr_init=cfg.optim.warmup_lr, cycle_limit=1, t_in_epochs=False)
    oracle = []
    for update in range(4 * steps):
        oracle.append(opt.param_groups[0]["lr"])
        sched.step_update(update + 1)
    assert cfg.optim.sched_on_updates and cfg.optim.cooldown_epochs == 0
    assert [ours(s) for s in range(4 * steps)] == pytest.approx(oracle, rel=1e-12, abs=0)
    assert len(set(oracle[:steps])) == steps                            # it moves within the warm-up epoch


@pytest.mark.parametrize("epochs, expected", [(1, [1e-3]), (2, [1e-6, 1e-3 * 0.5 + 1e-5 * 0.5])])
def test_runs_shorter_than_warmup_plus_cooldown_keep_one_cosine_epoch(epochs, expected):
    """`--epochs 1` / `--epochs 2` on a 5-warm-up, 10-cooldown recipe: at least one epoch under the cosine."""
    cfg = build_config({"data": {"data": "digits"}, "train": {"epochs": epochs}, "optim": {"lr": 1e-3}})
    ours = ours_at(cfg, 1e-3, 4)
    assert [ours(e * 4) for e in range(epochs)] == pytest.approx(expected, rel=1e-12)


def lr_table(cfg=None) -> str:
    """The epoch: ours vs timm table of the TNT-S recipe (printed by `python tests/test_schedule.py`)."""
    cfg = cfg or build_config(load_recipe("tnt-s-imagenet"), {"data.data": "imagenet"})
    o = cfg.optim
    ours = ours_at(cfg, o.lr, STEPS_PER_EPOCH)
    oracle = timm_epoch_lrs(cfg.train.epochs, lr=o.lr, warmup_lr=o.warmup_lr, warmup=o.warmup_epochs,
                            min_lr=o.min_lr, cooldown=o.cooldown_epochs)
    rows = ["| epoch (1-based) | ours lr | timm lr | ours - timm |", "|---:|---:|---:|---:|"]
    for e in (0, 1, 2, 3, 4, 5, 6, 50, 100, 150, 200, 250, 289, 298, 299, 300, 301, 309):
        a, b = ours(e * STEPS_PER_EPOCH), oracle[e]
        rows.append(f"| {e + 1} | {a:.9e} | {b:.9e} | {a - b:+.1e} |")
    return "\n".join(rows)


def test_metrics_record_the_lr_each_epoch_trained_at(tmp_path, image_folder, no_training_curves):
    """With the lr set once per epoch, the `lr` column is that epoch's rate (not the next epoch's, which the
    scheduler has already switched to after the epoch's last step)."""
    import pandas as pd

    from tntcli.engine.train import train

    cfg = build_config(None, {"model.name": "tnt-ti", "model.img_size": 16, "data.data": str(image_folder),
                              "model.arch": {"depth": 1, "patch_size": 8, "dim": 24, "heads": 2, "word_dim": 8,
                                             "inner_heads": 2},
                              "data.batch_size": 8, "data.workers": 0,
                              "train.epochs": 4, "train.ema_decay": None, "optim.warmup_epochs": 2,
                              "optim.cooldown_epochs": 1, "optim.lr": 1e-3, "optim.lr_ref_batch": 8})
    train(cfg, out=tmp_path / "run")
    want = timm_epoch_lrs(4, lr=1e-3, warmup_lr=1e-6, warmup=2, min_lr=1e-5, cooldown=1)   # the oracle, not ours
    assert pd.read_csv(tmp_path / "run" / "metrics.csv").lr.tolist() == pytest.approx(want, rel=1e-12)


if __name__ == "__main__":
    print(lr_table())
