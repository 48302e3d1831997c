"""The training engine: run folder contract, exact resume, preemption, bad input, eval, DDP."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import torch

from tntcli.config import build_config
from tntcli.engine import step as step_mod
from tntcli.engine import train as train_mod
from tntcli.engine.train import StopFlag, train
from tntcli.errors import Preempted, TntError

TINY_ARCH = {"depth": 1, "patch_size": 8, "inner_stride": 4, "dim": 32, "heads": 2, "word_dim": 8, "inner_heads": 2}


def tiny_config(**overrides):
    """A TNT of ~30k params on 16px digits: a few seconds per run on 2 cores, every engine feature switched on."""
    recipe = {
        "model": {"name": "tnt-ti", "img_size": 16, "drop_path": 0.1, "arch": TINY_ARCH},
        "data": {"data": "digits", "batch_size": 32, "workers": 0, "max_train_images": 128},
        "optim": {"lr": 0.02, "warmup_epochs": 1, "cooldown_epochs": 1},
        "aug": {"rand_augment": "rand-m9-mstd0.5-inc1", "mixup": 0.8, "cutmix": 1.0, "random_erasing": 0.25},
        "train": {"epochs": 3, "ema_decay": 0.9, "seed": 1},
    }
    return build_config(recipe, overrides)


def metrics(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "metrics.csv")


@pytest.fixture
def finished_run(tiny_run) -> Path:
    """`tiny_config()` trained to the end (once per session: tests/conftest.py)."""
    return tiny_run


def test_run_folder_holds_config_metrics_checkpoints_summary_and_plot(finished_run):
    df = metrics(finished_run)
    assert list(df.columns[:9]) == ["epoch", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "ema_top1",
                                    "img_per_s", "seconds"]
    assert df.epoch.tolist() == [1, 2, 3]
    assert df.val_top1.between(0, 100).all() and (df.val_top5 >= df.val_top1).all()
    summary = json.loads((finished_run / "summary.json").read_text())
    for key in ("model", "epochs", "best_top1", "final_top1", "params_m", "gmacs"):
        assert key in summary
    assert summary["status"] == "completed" and summary["final_top1"] == df.val_top1.iloc[-1]
    assert summary["best_top1"] == max(df.val_top1.max(), df.ema_top1.max())
    for name in ("config.yaml", "last.pt", "best.pt", "curves.png", "curves.svg"):
        assert (finished_run / name).is_file(), name


def test_lr_schedule_is_warmup_then_cosine_then_cooldown_set_once_per_epoch():
    cfg = tiny_config(**{"train.epochs": 5, "optim.warmup_epochs": 1, "optim.cooldown_epochs": 1})
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = train_mod.build_scheduler(opt, cfg, lr=1e-3, steps_per_epoch=10)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:10] == [pytest.approx(1e-6)] * 10               # warmup epoch at warmup_lr (timm: per epoch)
    assert all(len(set(lrs[e * 10:(e + 1) * 10])) == 1 for e in range(5))
    assert all(a > b for a, b in zip(lrs[10:40:10], lrs[20:40:10]))   # cosine decay over epochs 2-4
    assert lrs[40:] == pytest.approx([1e-5] * 10)               # cooldown epoch at min_lr


# Exact resume (epoch boundary and mid-epoch preemption): tests/test_exactness.py.


class StopAfter(StopFlag):
    """Raises the stop flag after `n` polls, like a SIGTERM arriving during step n."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    @property
    def raised(self):
        self.n -= 1
        return self.n < 0

    @raised.setter
    def raised(self, value):
        pass


def test_preempted_ranks_wait_for_rank_0s_checkpoint_before_exiting(tmp_path, monkeypatch):
    """The barrier comes after last.pt is on disk (under torchrun a rank that exits first gets the others killed)."""
    events = []
    real_save = train_mod.save_verified
    monkeypatch.setattr(train_mod, "save_verified", lambda record, path, **kw: (events.append(f"save {path.name}"),
                                                                                  real_save(record, path, **kw))[1])
    monkeypatch.setattr(train_mod.distributed, "barrier", lambda env: events.append("barrier"))
    with pytest.raises(Preempted):
        train(tiny_config(), out=tmp_path / "run", stop=StopAfter(2))
    assert events[-2:] == ["save last.pt", "barrier"]


def test_resuming_with_another_number_of_processes_is_refused_with_how_to(finished_run, tmp_path):
    from tntcli.engine.run_checkpoint import load_verified, save_verified

    run = tmp_path / "two"
    shutil.copytree(finished_run, run)
    record, _ = load_verified(run / "last.pt")
    assert record["world_size"] == 1
    record.update(world_size=2, rng=[record["rng"], record["rng"]])
    save_verified(record, run / "last.pt")
    with pytest.raises(TntError, match=r"trained with 2 process\(es\) and this resume has 1.*nproc_per_node 2"):
        train(tiny_config(**{"train.epochs": 4}), resume=run)


def test_existing_run_folder_is_refused_unless_overwrite(finished_run, tmp_path, no_training_curves):
    with pytest.raises(TntError, match="already exists.*--resume"):
        train(tiny_config(), out=finished_run)
    target = tmp_path / "again"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    train(tiny_config(**{"train.epochs": 1}), out=target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "summary.json").is_file()


@pytest.fixture
def nan_at_step_6(monkeypatch):
    """The 6th training loss (epoch 2, step 2 of the tiny run's 4-step epochs) is NaN."""
    calls = {"n": 0}
    real = torch.nn.functional.cross_entropy

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(step_mod, "F", types.SimpleNamespace(cross_entropy=poisoned))


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, nan_at_step_6):
    run = tmp_path / "nan"
    with pytest.raises(TntError, match="non-finite loss at epoch 2 step 2"):
        train(tiny_config(), out=run)
    assert torch.load(run / "last.pt", weights_only=False)["epoch"] == 1


def test_skip_policy_skips_the_non_finite_step_and_says_which(tmp_path, nan_at_step_6, no_training_curves):
    import io

    from rich.console import Console

    log = io.StringIO()
    summary = train(tiny_config(**{"train.nan_policy": "skip"}), out=tmp_path / "skip",
                    console=Console(file=log, width=200))
    assert summary["status"] == "completed"
    assert "non-finite loss at epoch 2 step 2: skipped" in log.getvalue()
    assert metrics(tmp_path / "skip").train_loss.notna().all()


def test_one_process_says_once_that_repeated_augmentation_is_off(tmp_path, monkeypatch, no_training_curves):
    import io

    from rich.console import Console

    import tntcli.engine.train as engine

    used = []
    real = engine.build_loaders
    monkeypatch.setattr(engine, "build_loaders", lambda *a, **kw: used.append(kw["repeated_aug"]) or real(*a, **kw))
    log = io.StringIO()
    cfg = tiny_config(**{"train.epochs": 1, "train.repeated_aug": 3})
    train(cfg, out=tmp_path / "off", console=Console(file=log, width=200))
    assert log.getvalue().count("repeated augmentation (train.repeated_aug=3) is off: the run has one process") == 1
    train(tiny_config(**{"train.epochs": 1, "train.repeated_aug": 3, "train.repeated_aug_single_process": True}),
          out=tmp_path / "forced", console=Console(file=io.StringIO()))
    assert used == [1, 3]


@pytest.mark.parametrize("overrides, message", [
    ({"optim.lrr": 1.0}, "unknown recipe key 'optim.lrr'"),
    ({"optim.lr": "fast"}, "optim.lr must be float"),
    ({"train.epochs": 0}, "train.epochs must be >= 1"),
    ({"bogus.key": 1}, "unknown recipe section"),
    ({"train.amp": "fp8"}, "train.amp must be"),
])
def test_bad_recipe_values_name_the_key(overrides, message):
    with pytest.raises(TntError, match=message):
        tiny_config(**overrides)


def run_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tntcli.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_eval_reports_top1_top5_as_json_and_appends_results_row(finished_run, tmp_path, tnt_main):
    result = tnt_main("eval", "--checkpoint", str(finished_run / "best.pt"), "--data", "digits", "--workers", "0",
                     "--json", "--results", str(tmp_path))
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("model", "checkpoint", "top1", "top5", "loss", "img_per_s", "n_images"):
        assert key in record
    summary = json.loads((finished_run / "summary.json").read_text())
    assert record["top1"] == pytest.approx(summary["best_top1"], abs=1e-3)
    assert pd.read_csv(tmp_path / "eval.csv").top1.tolist() == [record["top1"]]


@pytest.mark.parametrize("args, message", [
    (["train", "--recipe", "nope"], "recipe 'nope' not found"),
    (["train", "--model", "tnt-s", "--set", "optim.lrr=1"], "unknown recipe key 'optim.lrr'"),
    (["train", "--model", "tnt-s"], "no dataset"),
    (["train", "--resume", "/nonexistent/run"], "cannot resume"),
    (["eval", "--checkpoint", "/nonexistent.pt", "--data", "digits"], "checkpoint not found"),
])
def test_cli_bad_input_is_one_line_and_nonzero(args, message, tnt_main):
    result = tnt_main(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_two_process_ddp_matches_one_process_at_the_same_global_batch(tmp_path):
    common = ["train", "--recipe", str(tmp_path / "ddp.yaml")]
    recipe = {"model": {"name": "tnt-ti", "img_size": 16, "drop_path": 0.0, "arch": TINY_ARCH},
              "data": {"data": "digits", "workers": 0, "max_train_images": 128, "augment": False},
              "optim": {"lr": 0.02, "warmup_epochs": 0, "cooldown_epochs": 0},
              "train": {"epochs": 2, "ema_decay": None, "repeated_aug": 1}}
    import yaml
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(recipe))
    single = run_cli(*common, "--batch-size", "32", "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", "-m", "tntcli.cli", *common, "--batch-size", "16",
                          "--out", str(tmp_path / "ddp")], capture_output=True, text=True, env=env, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    a, b = metrics(tmp_path / "single"), metrics(tmp_path / "ddp")
    assert b.train_loss.tolist() == pytest.approx(a.train_loss.tolist(), rel=1e-4)
    assert b.val_top1.tolist() == pytest.approx(a.val_top1.tolist(), abs=0.6)


@pytest.mark.slow
def test_a_rank_failing_before_ddp_fails_every_rank_with_one_message(tmp_path):
    """Rank 1 cannot count GMACs (as without fvcore): both ranks stop with its message instead of rank 0 waiting
    forever in DDP's first broadcast."""
    launcher = tmp_path / "launch.py"
    launcher.write_text(
        "import os, sys\n"
        "import tntcli.engine.train as engine\n"
        "def no_fvcore(cfg):\n"
        "    raise ModuleNotFoundError(\"No module named 'fvcore'\", name='fvcore')\n"
        "if os.environ['RANK'] == '1':\n"
        "    engine.count_gmacs = no_fvcore\n"
        "from tntcli.cli import main\n"
        "main()\n")
    import yaml
    recipe = {"model": {"name": "tnt-ti", "img_size": 16, "arch": TINY_ARCH},
              "data": {"data": "digits", "workers": 0, "batch_size": 16, "max_train_images": 64},
              "train": {"epochs": 1}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29534", str(launcher), "train", "--recipe", str(tmp_path / "r.yaml"), "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("building the model failed on rank 1: ModuleNotFoundError: No module named 'fvcore'") \
        == 2, done.stderr[-3000:]


def test_a_resume_after_an_epochs_last_step_records_the_rate_that_epoch_trained_at(finished_run, tmp_path,
                                                                                    no_training_curves):
    """Stopped at the last step of epoch 1, the resumed run has no step left in that epoch; its metrics row must
    still carry epoch 1's rate (not the next epoch's, which the scheduler has already moved to)."""
    run = tmp_path / "stopped-at-epoch-end"
    with pytest.raises(Preempted):
        train(tiny_config(), out=run, stop=StopAfter(3))     # 4 steps per epoch: stops at epoch 1, step 4
    state = torch.load(run / "last.pt", weights_only=False)
    assert (state["epoch"], state["step_in_epoch"]) == (0, 4)
    train(tiny_config(), resume=run)
    assert metrics(run).lr.tolist() == metrics(finished_run).lr.tolist()
