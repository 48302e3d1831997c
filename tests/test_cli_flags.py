"""The run flags of `tnt train`, `tnt transfer` and `tnt ablate` come from the recipe key declarations in config.py:
every spelling users type (ours and timm's) lands on its recipe key, and the three commands agree."""
from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from tntcli import cli
from tntcli.config import build_config, load_recipe, recipe_keys

runner = CliRunner()


@pytest.fixture
def captured(monkeypatch):
    """Run `tnt train` up to the engine and capture the RunConfig it would train with."""
    import tntcli.engine.train as engine

    seen = {}

    def fake_train(cfg, **kwargs):
        seen["cfg"], seen["kwargs"] = cfg, kwargs
        return {"best_top1": 1.0, "best_source": "model", "best_epoch": 1, "final_top1": 1.0}

    monkeypatch.setattr(engine, "train", fake_train)
    return seen


def train_config(captured, *args: str):
    result = runner.invoke(cli.app, ["train", "--data", "digits", *args])
    assert result.exit_code == 0, result.output
    return captured["cfg"].to_dict(), captured["kwargs"]


SPELLINGS = [
    (["--epochs", "3"], "train.epochs", 3),
    (["--batch-size", "8"], "data.batch_size", 8),
    (["-b", "8"], "data.batch_size", 8),
    (["--workers", "0"], "data.workers", 0),
    (["-j", "0"], "data.workers", 0),
    (["--lr", "0.5"], "optim.lr", 0.5),
    (["--weight-decay", "0.1"], "optim.weight_decay", 0.1),
    (["--drop-path", "0.2"], "model.drop_path", 0.2),
    (["--warmup-epochs", "2"], "optim.warmup_epochs", 2),
    (["--smoothing", "0.2"], "aug.label_smoothing", 0.2),
    (["--mixup", "0"], "aug.mixup", 0.0),
    (["--cutmix", "0.5"], "aug.cutmix", 0.5),
    (["--model-ema-decay", "0.999"], "train.ema_decay", 0.999),
    (["--no-model-ema"], "train.ema_decay", 0.0),
    (["--amp"], "train.amp", "bf16"),
    (["--no-amp"], "train.amp", "off"),
    (["--precision", "fp16"], "train.amp", "fp16"),
    (["--amp", "--precision", "fp16"], "train.amp", "fp16"),       # the value flag wins over the switch
    (["--backend", "cpu-fast"], "train.backend", "cpu-fast"),
    (["--compile"], "train.compile", True),
    (["--model", "deit-s"], "model.name", "deit-s"),
    (["--img-size", "64"], "model.img_size", 64),
    (["--max-steps", "2"], "train.max_steps", 2),
    (["--strict"], "data.strict", True),
    (["--freeze-backbone"], "model.freeze_backbone", True),
    (["--lr", "0.5", "--set", "optim.lr=0.25"], "optim.lr", 0.25),  # --set wins over flags
]


@pytest.mark.parametrize("args, key, value", SPELLINGS, ids=[" ".join(a) for a, _, _ in SPELLINGS])
def test_each_spelling_sets_its_recipe_key(captured, args, key, value):
    cfg, _ = train_config(captured, *args)
    section, name = key.split(".")
    assert cfg[section][name] == value


def test_flags_left_out_keep_the_recipe_values(captured):
    cfg, _ = train_config(captured, "--recipe", "quickstart")
    assert cfg == build_config(load_recipe("quickstart")).to_dict()


def test_output_is_a_spelling_of_out(captured, tmp_path):
    _, kwargs = train_config(captured, "--output", str(tmp_path / "run"))
    assert kwargs["out"] == tmp_path / "run"


def test_bad_backend_is_named(captured):
    result = runner.invoke(cli.app, ["train", "--data", "digits", "--backend", "fast"])
    assert result.exit_code != 0 and "train.backend must be one of auto, reference, cpu-fast, cpu-eager, cuda" in str(
        result.exception)


def _options(command: str) -> set[str]:
    import typer

    params = typer.main.get_command(cli.app).commands[command].params
    return {name for p in params for name in (*p.opts, *p.secondary_opts)}


def test_train_transfer_and_ablate_share_every_declared_flag():
    declared = {name for key in recipe_keys() for f in key.flags for part in f.names for name in part.split("/")}
    assert {"--lr", "-j", "--amp", "--no-amp", "--precision", "--backend", "--model-ema"} <= declared
    for command in ("train", "transfer", "ablate"):
        missing = declared - _options(command)
        assert not missing, f"tnt {command} lacks {sorted(missing)}"


def test_help_says_the_lr_is_at_batch_1024_scaled_linearly():
    text = " ".join(runner.invoke(cli.app, ["train", "--help"], env={"COLUMNS": "200"}).output.split())
    assert re.search(r"--lr .*1024.*scaled linearly", text)
