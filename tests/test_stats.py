"""Uncertainty of compared accuracies (tntcli.stats), `tnt train --seeds` and when a paper figure may stand beside
ours (tntcli.paper.setting_gap)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml

from tntcli import stats
from tntcli.paper import is_imagenet_1k, setting_gap


def test_t_interval_of_paired_differences_matches_the_textbook():
    d = stats.t_interval([1.0, 2.0, 3.0])                 # mean 2, sd 1, t(0.975, 2) = 4.3027
    assert (d.delta, d.n_pairs) == (2.0, 3)
    assert (d.low, d.high) == pytest.approx((2 - 4.3027 / math.sqrt(3), 2 + 4.3027 / math.sqrt(3)), abs=1e-3)
    assert d.verdict == "within noise" and d.method == "t over 3 seeds"
    assert stats.t_interval([1.0, 1.2, 0.9, 1.1]).verdict == "better"
    assert stats.t_interval([-1.0, -1.2, -0.9]).verdict == "worse"
    one = stats.t_interval([1.5])
    assert one.delta == 1.5 and math.isnan(one.low) and one.verdict == "unknown"


def test_paired_delta_pairs_by_seed_and_ignores_unpaired_seeds():
    variant, base = {0: 60.0, 1: 62.0, 2: 61.0, 7: 99.0}, {0: 59.0, 1: 60.0, 2: 60.5, 5: 0.0}
    d = stats.paired_delta(variant, base)
    assert d.delta == pytest.approx((1 + 2 + 0.5) / 3) and d.n_pairs == 3
    assert stats.paired_delta({3: 1.0}, {4: 1.0}).method == "no seed run by both"


def test_bootstrap_over_images_is_paired_and_reads_the_interval():
    rng = np.random.default_rng(0)
    base = rng.random(2000) < 0.6
    same = stats.bootstrap_interval(base, base)
    assert (same.delta, same.low, same.high) == (0.0, 0.0, 0.0) and same.verdict == "within noise"
    better = base.copy()
    better[np.flatnonzero(~base)[:200]] = True           # 200 more of 2000 images right: +10 points
    d = stats.bootstrap_interval(better, base)
    assert d.delta == pytest.approx(10.0) and 8.0 < d.low < 10.0 < d.high < 12.0 and d.verdict == "better"
    assert stats.bootstrap_interval(base, better).verdict == "worse"
    flip = base.copy()
    flip[:20] = ~flip[:20]                               # 20 images changed, both ways: no real difference
    assert stats.bootstrap_interval(flip, base).verdict == "within noise"
    via_seeds = stats.paired_delta({0: 70.0}, {0: 60.0}, (better, base))
    assert via_seeds.delta == 10.0 and via_seeds.method == "bootstrap over 2000 val images"
    with pytest.raises(ValueError):
        stats.bootstrap_interval(base[:10], base)


def test_spread_is_mean_and_sample_std():
    s = stats.spread([60.0, 62.0, None])
    assert (s.mean, s.n) == (61.0, 2) and s.std == pytest.approx(math.sqrt(2))
    assert math.isnan(stats.spread([5.0]).std) and stats.spread([]).n == 0


def test_paper_figures_only_in_the_papers_setting():
    assert is_imagenet_1k("imagenet", 1000) and is_imagenet_1k("ILSVRC2012_val", 1000)
    assert not is_imagenet_1k("imagenet-100", 100) and not is_imagenet_1k("places", 1000)
    assert setting_gap("tnt-s", {}, 224, "imagenet", 1000) is None
    gap = setting_gap("tnt-ti", {"depth": 4}, 32, "cifar10-5k", 10)
    assert gap.startswith("not the paper's setting") and gap.endswith(
        "modified architecture, 32px, cifar10-5k (10 classes)")
    assert setting_gap("tnt-s-legacy", {}, 224, "imagenet", 1000).endswith("the paper has no tnt-s-legacy")
    assert setting_gap("tnt-s", {}, 384, "imagenet", 1000).endswith("384px")


def test_train_seeds_makes_one_folder_per_seed_and_reuses_finished_ones(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tntcli import seeds
    from tntcli.cli import app

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": "tnt-ti", "img_size": 16, "drop_path": 0.0,
                  "arch": {"depth": 1, "patch_size": 8, "inner_stride": 2, "dim": 16, "heads": 2, "word_dim": 4,
                           "inner_heads": 1}},
        "data": {"data": "digits", "batch_size": 32, "workers": 0, "max_train_images": 64},
        "optim": {"warmup_epochs": 0, "cooldown_epochs": 0}, "aug": {"rand_augment": None, "mixup": 0.0,
                                                                     "cutmix": 0.0, "random_erasing": 0.0},
        "train": {"epochs": 1, "ema_decay": None}}))
    args = ["train", "--recipe", str(recipe), "--seeds", "1,3", "--out", str(tmp_path / "runs")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for seed in (1, 3):
        run = tmp_path / "runs" / f"seed-{seed}"
        assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == seed
        assert json.loads((run / "summary.json").read_text())["status"] == "completed"
        assert (run / "val_predictions.csv").is_file()
    assert "best top-1 over 2 seeds:" in result.output
    monkeypatch.setattr("tntcli.engine.train.train", lambda *a, **k: pytest.fail("retrained a finished seed"))
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and again.output.count("reusing finished run") == 2, again.output
    assert seeds.config_digest(seeds.with_seed(seeds.build_config({}, {"data.data": "digits"}), 4),
                               ignore_seed=True) == seeds.config_digest(
        seeds.build_config({}, {"data.data": "digits"}), ignore_seed=True)


def test_eval_prints_the_papers_figures_only_on_the_imagenet_val_set():
    from tntcli.paper import eval_beside_paper

    assert eval_beside_paper("tnt-s", "/data/imagenet", 224, 50_000) == \
        "paper (Table 4, arXiv v4): top-1 81.5%, top-5 95.7%"
    assert eval_beside_paper("deit-s", "ILSVRC2012.beton", 224, 50_000) == "paper (Table 4, arXiv v4): top-1 79.8%"
    assert eval_beside_paper("tnt-s", "/data/imagenet", 384, 50_000).endswith("(384px)")
    assert "cifar10 (1000 images)" in eval_beside_paper("tnt-s", "cifar10", 224, 1000)
    assert "imagenet (5000 images)" in eval_beside_paper("tnt-s", "/data/imagenet", 224, 5000)
    assert eval_beside_paper("tnt-s-legacy", "/data/imagenet", 224, 50_000) is None


def test_transfer_seeds_fine_tune_once_per_seed_in_a_folder_named_by_the_config(tmp_path, monkeypatch):
    from tntcli.models.weights import save_model
    from tntcli.models.registry import create_model
    from tntcli.transfer import run_transfer_seeds

    arch = dict(depth=1, patch_size=8, inner_stride=2, dim=16, heads=2, word_dim=4, inner_heads=1)
    ckpt = save_model(create_model("tnt-ti", img_size=16, num_classes=3, **arch), "tnt-ti", tmp_path / "pre.pt")
    overrides = {"data.data": "digits", "train.epochs": 1, "data.batch_size": 32, "data.workers": 0,
                 "data.max_train_images": 64, "aug.mixup": 0.0, "aug.cutmix": 0.0, "aug.rand_augment": None,
                 "train.ema_decay": None}
    monkeypatch.chdir(tmp_path)
    summaries = run_transfer_seeds(ckpt, [0, 2], overrides=overrides)
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("transfer-tnt-ti-16px-digits-")
    assert [s["seed"] for s in summaries] == [0, 2] and all(s["status"] == "completed" for s in summaries)
    assert sorted(p.name for p in folders[0].iterdir()) == ["seed-0", "seed-2"]
    for seed in (0, 2):
        saved = yaml.safe_load((folders[0] / f"seed-{seed}" / "config.yaml").read_text())
        assert saved["train"]["seed"] == seed and saved["model"]["pretrained"] == str(ckpt)
