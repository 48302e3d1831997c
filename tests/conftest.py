"""Shared test fixtures: one torch thread, tiny generated image folders and the `ffcv` marker policy."""
from __future__ import annotations

import os
import subprocess
import sys

# The test models are tiny: one thread per process costs nothing and avoids the 5-10x slowdown of
# oversubscribed cores when subprocess tests (torchrun, kill/resume) run beside the main process.
os.environ.setdefault("OMP_NUM_THREADS", "1")
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------ data layer
def make_image_folder(root: Path, classes=("cat", "dog", "emu"), per_class=(8, 3), size=(20, 24), seed=0) -> Path:
    """`root/train/<class>/*.jpg` + `root/val/<class>/*.jpg` of random RGB JPEGs (sizes vary a little)."""
    rng = np.random.default_rng(seed)
    for split, count in zip(("train", "val"), per_class):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (size[0] + i % 3, size[1], 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "imgs")


# ------------------------------------------------------------------------------------------ the command line
@pytest.fixture
def tnt_main(monkeypatch, capsys):
    """`tnt ARGS` through the console entry point `main()` in this process, from `cwd` if given: the exit code,
    stdout and stderr as a CompletedProcess, without the 2-4 s of a fresh interpreter importing torch.
    (tests/test_cli_models.py runs `python -m tntcli.cli` in a fresh process once, for the process exit.)"""
    from tntcli.cli import main

    def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
        argv = ["tnt", *map(str, args)]
        capsys.readouterr()                                  # drop what the test printed before
        with monkeypatch.context() as patch:
            patch.setattr(sys, "argv", argv)
            if cwd is not None:
                patch.chdir(cwd)
            with pytest.raises(SystemExit) as stop:          # main() always exits, with 0 on success
                main()
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, stop.value.code, out, err)

    return run


def _ffcv_available() -> bool:
    from tntcli.data.beton import ffcv_available

    return ffcv_available()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """`@pytest.mark.ffcv` tests skip without ffcv, but fail when TNT_REQUIRE_FFCV=1 (CI with the extra)."""
    if item.get_closest_marker("ffcv") is None or _ffcv_available():
        return
    message = "ffcv is not installed (run `make ffcv`)"
    if os.environ.get("TNT_REQUIRE_FFCV") == "1":
        pytest.fail(f"{message} but TNT_REQUIRE_FFCV=1", pytrace=False)
    pytest.skip(message)


# ------------------------------------------------------------------------------------------ engine
@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One finished run of tests/test_engine.py's `tiny_config()` (3 epochs, every engine feature on), trained once
    per session for the tests that only read or copy it (run folder contract, eval, weights-only files, exact
    resume): none may change it."""
    from test_engine import tiny_config

    from tntcli.engine.train import train

    run = tmp_path_factory.mktemp("tiny-run") / "run"
    train(tiny_config(), out=run)
    return run


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A saved 1-block TNT-Ti (16px, 10 classes) that transfer and install tests fine-tune or refuse; read only."""
    from test_engine import TINY_ARCH

    from tntcli.models import create_model, save_model

    return save_model(create_model("tnt-ti", img_size=16, num_classes=10, **TINY_ARCH), "tnt-ti",
                      tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture
def no_training_curves(monkeypatch):
    """For tests whose subject is not the curves plot: a finished run skips drawing curves.png/.svg (matplotlib's
    render is a third of a tiny run's CPU time). The run-folder test in tests/test_engine.py checks the real files,
    from `tiny_run`, which is session-scoped and so always built before this function-scoped patch applies."""
    from tntcli import results

    monkeypatch.setattr(results, "plot_training_curves", lambda histories, stem: [])


# ------------------------------------------------------------------------------------------ flops
@pytest.fixture(scope="session")
def paper_flops_table():
    """`tnt flops --all`'s table (every paper model at 224px), measured once per test session (~10 s)."""
    from tntcli.flops import PAPER_MODELS, flops_table

    return flops_table(PAPER_MODELS)
