"""Surviving kills, preemption, torn files and concurrent writers without losing work."""
from __future__ import annotations

import json
import multiprocessing
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tntcli.engine.run_checkpoint import load_verified, save_verified
from tntcli.errors import EXIT_PREEMPTED, TntError

from results_writer import append_rows
from test_engine import TINY_ARCH
from test_exactness import assert_same_run

RECIPE = {
    "model": {"name": "tnt-ti", "img_size": 16, "drop_path": 0.1, "arch": TINY_ARCH},
    "data": {"data": "digits", "batch_size": 32, "workers": 0, "max_train_images": 192},
    "optim": {"lr": 0.02, "warmup_epochs": 1, "cooldown_epochs": 0},
    "aug": {"mixup": 0.8, "cutmix": 1.0},
    "train": {"epochs": 3, "ema_decay": 0.9, "seed": 3, "checkpoint_every_steps": 1},
}


def start_training(tmp_path: Path, run: Path, *extra: str) -> subprocess.Popen:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    args = ["--resume", str(run)] if extra == ("resume",) else ["--recipe", str(recipe), "--out", str(run), *extra]
    return subprocess.Popen([sys.executable, "-m", "tntcli.cli", "train", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> int:
    _, err = proc.communicate(timeout=300)
    assert "Traceback" not in err, err
    return proc.returncode


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("reference")
    run = tmp / "run"
    assert finish(start_training(tmp, run)) == 0
    return run


STEPS_PER_EPOCH = 6                                             # 192 images / batch 32


def wait_for_step(run: Path, proc: subprocess.Popen, target: int, timeout: float = 120) -> None:
    """Poll the checkpoint (saved every step) until training has passed global step `target`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "training ended before the target step"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                record, _ = load_verified(run / "last.pt")
            if record["epoch"] * STEPS_PER_EPOCH + record["step_in_epoch"] >= target:
                return
        except TntError:                                         # not written yet
            pass
        time.sleep(0.005)
    raise AssertionError(f"step {target} never reached")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(reference_run, tmp_path, seed):
    run = tmp_path / "run"
    proc = start_training(tmp_path, run)
    wait_for_step(run, proc, random.Random(seed).randint(1, 15))  # of 18 steps
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    record, source = load_verified(run / "last.pt")             # whatever the moment, a readable checkpoint
    assert source.name in ("last.pt", "last.prev.pt")
    assert record["epoch"] < 3, "the kill landed after training had finished"
    assert finish(start_training(tmp_path, run, "resume")) == 0
    assert_same_run(run, reference_run, rng=False)          # bit-identical weights, EMA, optimiser, metrics


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_signal_saves_exits_with_its_code_and_resumes(reference_run, tmp_path, sig):
    run = tmp_path / "run"
    proc = start_training(tmp_path, run)
    wait_for_step(run, proc, 2)
    proc.send_signal(sig)
    assert finish(proc) == EXIT_PREEMPTED
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert finish(start_training(tmp_path, run, "resume")) == 0
    assert_same_run(run, reference_run, rng=False)          # bit-identical weights, EMA, optimiser, metrics


def test_a_save_killed_after_any_file_operation_leaves_a_readable_checkpoint(tmp_path, monkeypatch):
    """Deterministic version of the SIGKILL test: the k-th rename/unlink of a save (k = 0, 1, ...) raises instead
    of running, as if the process died there. The newest readable checkpoint is then the new one or the one
    before, never none (a kill between moving the file and its checksum once left `last.prev.pt` beside the
    checksum of an older file)."""
    import os
    from pathlib import Path

    path = tmp_path / "last.pt"
    real_replace, real_unlink = os.replace, Path.unlink
    for k in range(20):
        for leftover in tmp_path.iterdir():
            real_unlink(leftover)
        save_verified({"epoch": 1}, path)
        save_verified({"epoch": 2}, path)
        calls = iter(range(10**6))

        def maybe_die(real):
            def op(*args, **kwargs):
                if next(calls) == k:
                    raise KeyboardInterrupt("killed")
                return real(*args, **kwargs)
            return op

        monkeypatch.setattr(os, "replace", maybe_die(real_replace))
        monkeypatch.setattr(Path, "unlink", maybe_die(real_unlink))
        try:
            save_verified({"epoch": 3}, path)
            finished = True
        except KeyboardInterrupt:
            finished = False
        monkeypatch.undo()
        record, _ = load_verified(path)
        assert record["epoch"] in ((3,) if finished else (2, 3)), f"killed at file operation {k}"
        if finished:
            break
    else:
        raise AssertionError("a save takes more than 20 file operations")
    assert k >= 5                                   # the kill points covered every step of the save


def test_corrupt_checkpoint_is_detected_and_the_previous_one_used(tmp_path):
    path = tmp_path / "last.pt"
    save_verified({"epoch": 1, "w": torch.arange(1000.0)}, path)
    save_verified({"epoch": 2, "w": torch.arange(1000.0)}, path)
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF                                # one flipped bit-pattern in the middle
    path.write_bytes(bytes(blob))
    with pytest.warns(UserWarning, match="checksum mismatch"):
        record, source = load_verified(path)
    assert record["epoch"] == 1 and source.name == "last.prev.pt"


def test_truncated_checkpoints_with_no_good_copy_give_a_clear_error(tmp_path):
    path = tmp_path / "last.pt"
    save_verified({"epoch": 1}, path)
    path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(TntError, match="no readable checkpoint"):
        load_verified(path)


def test_concurrent_results_writers_lose_no_row(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=append_rows, args=(str(tmp_path), w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    table = pd.read_csv(tmp_path / "table.csv")
    assert len(table) == 60 and sorted(table.groupby("worker").size().tolist()) == [20, 20, 20]
    assert not list(tmp_path.glob(".*.tmp"))                   # no temp file left behind


def test_a_truncated_image_is_skipped_with_a_warning_or_stops_the_run_under_strict(tmp_path, no_training_curves):
    from conftest import make_image_folder
    from test_engine import tiny_config

    from tntcli.engine.train import train

    data = make_image_folder(tmp_path / "imgs", per_class=(12, 4))
    bad = data / "train" / "cat" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:100])                     # a download cut short
    settings = {"data.data": str(data), "data.max_train_images": None, "data.batch_size": 8, "train.epochs": 1}
    with pytest.warns(UserWarning, match="0.jpg"):
        summary = train(tiny_config(**settings), out=tmp_path / "lenient")
    assert summary["status"] == "completed"
    with pytest.raises(TntError, match="0.jpg"):
        train(tiny_config(**settings, **{"data.strict": True}), out=tmp_path / "strict")
