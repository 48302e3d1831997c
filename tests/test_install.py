"""What an installed `tnt` needs beyond the checkout: shipped recipes found by name from any folder, transfer
defaults that are never the ImageNet pre-training ones, .safetensors and weights-only checkpoints, clean one-line
errors for a bad --out, and no torch build chatter. (`make wheel-check` runs the built wheel itself.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_engine import TINY_ARCH

from tntcli.config import build_config, find_recipe, load_recipe, recipe_names
from tntcli.models import create_model, load_checkpoint, save_model
from tntcli.models.weights import export_timm, read_checkpoint
from tntcli.transfer import default_recipe, head_swap, transfer_config

REPO = Path(__file__).resolve().parent.parent
TINY = dict(TINY_ARCH, img_size=16)


# ------------------------------------------------------------------------------------------------ recipes
SHIPPED = ["cifar10-study", "deit-b-imagenet", "deit-s-imagenet", "deit-ti-imagenet", "quickstart", "tnt-b-imagenet", "tnt-s-imagenet",
           "tnt-ti-imagenet", "transfer/cifar10", "transfer/cifar100", "transfer/default", "transfer/flowers102",
           "transfer/pets"]


def test_recipes_ship_inside_the_package():
    assert recipe_names() == SHIPPED
    assert all(Path(str(find_recipe(n))).is_relative_to(REPO / "tntcli" / "recipes") for n in SHIPPED)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"recipes/*.yaml", "recipes/*/*.yaml"' in pyproject          # so the wheel carries them


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_is_a_valid_config(name):
    cfg = build_config(load_recipe(name), {"data.data": "digits"})
    assert cfg.train.epochs >= 1


def test_a_recipe_is_found_by_name_from_any_folder_and_a_path_still_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_recipe("quickstart")["data"]["data"] == "digits"
    assert load_recipe("transfer/cifar10")["model"]["img_size"] == 384
    own = tmp_path / "mine.yaml"
    own.write_text(yaml.safe_dump({"train": {"epochs": 7}}))
    assert load_recipe(str(own)) == {"train": {"epochs": 7}}
    assert load_recipe("mine.yaml") == {"train": {"epochs": 7}}      # relative to the working folder


def test_a_named_recipe_that_does_not_exist_is_an_error_listing_the_shipped_ones(tmp_path, tnt_main):
    result = tnt_main("train", "--recipe", "tnt-s-imagenett", "--data", "digits", cwd=tmp_path)
    assert result.returncode == 2
    line, = result.stderr.strip().splitlines()
    assert "recipe 'tnt-s-imagenett' not found" in line and "tnt-s-imagenet" in line and "quickstart" in line


# ------------------------------------------------------------------------------------------------ transfer defaults
def test_unnamed_data_fine_tunes_with_the_transfer_default_not_the_imagenet_recipe(tiny_checkpoint, image_folder):
    assert default_recipe(str(image_folder)) == default_recipe("digits") == "transfer/default"
    cfg = transfer_config(tiny_checkpoint, overrides={"data.data": str(image_folder)})
    imagenet = build_config({}, {"data.data": "x"})                    # the defaults: the paper's pre-training
    assert cfg.optim.lr != imagenet.optim.lr and cfg.train.ema_decay is None
    assert (cfg.aug.mixup, cfg.aug.cutmix, cfg.optim.warmup_epochs, cfg.optim.sched_on_updates) == (0, 0, 1, True)
    assert cfg.to_dict() == build_config(load_recipe("transfer/default"), {
        "data.data": str(image_folder), "model.name": "tnt-ti", "model.img_size": 16, "model.arch": cfg.model.arch,
        "model.pretrained": str(tiny_checkpoint)}).to_dict()


def test_a_named_dataset_uses_its_shipped_transfer_recipe(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                          # no recipes/ folder here
    cfg = transfer_config(tiny_checkpoint, overrides={"data.data": "cifar10"})       # no data is read
    assert (cfg.train.epochs, cfg.model.img_size, cfg.data.crop_pct, cfg.optim.lr) == (64, 384, 1.0, 5e-5)


def test_transfer_cli_on_a_folder_says_its_recipe_and_head_swap_and_fine_tunes(tiny_checkpoint, image_folder,
                                                                               tmp_path, tnt_main, no_training_curves):
    result = tnt_main("transfer", "--checkpoint", str(tiny_checkpoint), "--data", str(image_folder), "--epochs", "1",
                 "--batch-size", "8", "--workers", "0", "--out", str(tmp_path / "ft"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "recipe: transfer/default; head: 10 -> 3 classes (a new, randomly initialised head)" in result.stdout
    assert "done: tnt-ti at 16px on" in result.stdout and "(3 classes)" in result.stdout
    record = torch.load(tmp_path / "ft" / "last.pt", weights_only=False)
    assert record["model"]["head.weight"].shape == (3, 32) and record["epoch"] == 1
    saved = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())
    assert saved["model"]["pretrained"] == str(tiny_checkpoint) and saved["optim"]["sched_on_updates"] is True


def test_the_head_swap_is_named_with_old_and_new_class_counts(image_folder):
    assert head_swap({"head.weight": torch.zeros(1000, 8)}, str(image_folder)) == \
        "head: 1000 -> 3 classes (a new, randomly initialised head)"
    assert head_swap({"head.weight": torch.zeros(1000, 8)}, "cifar100").startswith("head: 1000 -> 100 classes")


# ------------------------------------------------------------------------------------------------ checkpoints
def test_a_safetensors_checkpoint_loads_with_the_same_logits(tmp_path):
    from safetensors.torch import save_file

    model = create_model("tnt-ti", num_classes=10, **TINY).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    save_file({k: v.contiguous() for k, v in export_timm(model).items()}, str(tmp_path / "model.safetensors"))
    loaded, name = load_checkpoint(tmp_path / "model.safetensors", "tnt-ti", num_classes=10, **TINY)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert name == "tnt-ti" and torch.equal(loaded.eval()(x), model(x))


def test_our_model_files_load_weights_only(tmp_path, monkeypatch):
    """Our files hold tensors, strings, numbers and dicts: torch's weights-only unpickler reads them, and
    read_checkpoint never needs the full unpickler for them."""
    path = save_model(create_model("tnt-ti", **TINY), "tnt-ti", tmp_path / "m.pt")
    assert torch.load(path, weights_only=True)["format"] == "tntcli"
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("weights_only")) or real(*a, **k))
    read_checkpoint(path)
    assert calls == [True]


def test_a_trained_runs_best_checkpoint_loads_weights_only(tiny_run):
    """A run with an EMA (tiny_config's decay 0.9): best.pt is read by torch's weights-only unpickler."""
    record = torch.load(tiny_run / "best.pt", weights_only=True)
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert record["format"] == "tntcli"
    assert (record["best"]["epoch"], record["best"]["source"]) == (summary["best_epoch"], summary["best_source"])


# ------------------------------------------------------------------------------------------------ CLI hygiene
def test_out_on_an_existing_file_is_one_line_and_exit_2(tmp_path, tnt_main):
    afile = tmp_path / "taken"
    afile.write_text("x")
    for args in (["train", "--recipe", "quickstart", "--max-steps", "1"], ["flops", "-m", "deit-ti"]):
        result = tnt_main(*args, "--out", str(afile), cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        line, = result.stderr.strip().splitlines()
        assert str(afile) in line and ("Not a directory" in line or "File exists" in line)
        assert "Traceback" not in result.stderr and afile.read_text() == "x"


def test_out_on_an_unwritable_place_is_one_line_and_exit_2(tmp_path, tnt_main):
    target = Path("/sys/tnt-test-run")                # read-only even for root
    try:
        target.mkdir()
    except OSError:
        pass
    else:
        target.rmdir()
        pytest.skip("/sys is writable here")
    result = tnt_main("train", "--recipe", "quickstart", "--max-steps", "1", "--out", str(target), cwd=tmp_path)
    assert result.returncode == 2
    line, = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {target}: ") and ("not permitted" in line or "Read-only" in line
                                                      or "Permission denied" in line)


CUDA_CHATTER = "No CUDA runtime is found"


@pytest.mark.slow                       # a fresh interpreter importing the whole training stack: ~5 s of CPU
def test_cpu_commands_print_no_cuda_runtime_line(tmp_path, image_folder):
    """torch.utils.cpp_extension logs that line when imported; only building the CPU kernel should import it.
    The line comes once per process, at that import: one fresh interpreter runs `tnt flops` and a training step
    of the quickstart model (its CPU backend loads the built kernel) through `main()`, one after the other. The
    step trains on a generated folder (24 train, 9 val images): the same command path as digits, a short evaluation."""
    commands = [["flops", "-m", "tnt-ti", "--out", str(tmp_path / "flops")],
                ["train", "--recipe", "quickstart", "--data", str(image_folder), "--batch-size", "8", "--workers", "0",
                 "--epochs", "1", "--max-steps", "1", "--out", str(tmp_path / "r")]]
    driver = ("import json, sys\n"
              "from tntcli.cli import main\n"
              "for args in json.loads(sys.argv[1]):\n"
              "    sys.argv = ['tnt', *args]\n"
              "    try:\n"
              "        main()\n"
              "    except SystemExit as stop:\n"
              "        if stop.code:\n"
              "            raise\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}     # the checkout, not the working folder
    result = subprocess.run([sys.executable, "-c", driver, json.dumps(commands)], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "flops" / "flops.csv").is_file() and (tmp_path / "r" / "summary.json").is_file()
    assert CUDA_CHATTER not in result.stderr + result.stdout


def test_curve_plots_tick_whole_epochs_only(tmp_path, monkeypatch):
    from tntcli import results

    captured = {}
    monkeypatch.setattr(results, "save_figure", lambda fig, stem: captured.setdefault("fig", fig) and [])
    rows = [{"epoch": e, "train_loss": 2.0 / e, "val_top1": 10.0 * e} for e in (1, 2, 3)]
    results.plot_training_curves({"run": rows}, tmp_path / "curves")
    for ax in captured["fig"].axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
