"""`tnt ablate` and `tnt results`: flag -> architecture mapping, run reuse/resume, tables, plots and bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tntcli import ablate
from tntcli.ablate import AblationFlags, plan_variants
from tntcli.config import build_config
from tntcli.flops import count_macs, trainable_params
from tntcli.models.registry import build_model

REPO = Path(__file__).resolve().parents[1]
# 16px images, 8px patches of 4x4 words (inner stride 2), c=8: words x c = 128 per patch; two blocks.
TINY_ARCH = {"depth": 2, "patch_size": 8, "inner_stride": 2, "dim": 32, "heads": 2, "word_dim": 8, "inner_heads": 2}
CSV_CONTRACT = ["variant", "params_m", "gmacs", "img_per_s", "top1", "delta_top1", "paper_top1", "paper_delta_top1",
                "run_dir"]


def tiny_base(**overrides):
    recipe = {
        "model": {"name": "tnt-ti", "img_size": 16, "drop_path": 0.0, "arch": TINY_ARCH},
        "data": {"data": "digits", "batch_size": 32, "workers": 0, "max_train_images": 64},
        "optim": {"lr": 0.02, "warmup_epochs": 0, "cooldown_epochs": 0},
        "aug": {"rand_augment": None, "mixup": 0.0, "cutmix": 0.0, "random_erasing": 0.0},
        "train": {"epochs": 1, "ema_decay": None, "seed": 0},
    }
    return build_config(recipe, overrides)


def by_name(variants):
    return {v.name: v for v in variants}


def size(variant) -> tuple[float, float]:
    """Params (M) and GMACs of a variant's model."""
    model = build_model(ablate.model_cfg(variant.cfg, num_classes=10))
    with torch.no_grad():
        return trainable_params(model) / 1e6, count_macs(model, 16).total() / 1e9


# ----------------------------------------------------------------------------------------------- mapping
def test_flags_map_to_arch_overrides_with_the_papers_direction_of_params_and_gmacs():
    variants = by_name(plan_variants(tiny_base(), AblationFlags(no_inner=True, inner_blocks=["1"], se=True,
                                                                words="4,16,64", no_word_pos=True,
                                                                no_sentence_pos=True, no_pos=True)))
    assert list(variants) == ["baseline", "no-inner", "inner-blocks=1", "no-word-pos", "no-sentence-pos", "no-pos",
                              "words=4", "words=64", "se"]
    assert variants["baseline"].same_as == ["words=16"]           # 16 words is the base itself: folded
    arch = {name: v.cfg.model.arch for name, v in variants.items()}
    assert arch["no-inner"]["inner_blocks"] == [] and arch["inner-blocks=1"]["inner_blocks"] == [0]
    assert (arch["words=4"]["inner_stride"], arch["words=4"]["word_dim"]) == (4, 32)      # 4 x 32 = 16 x 8
    assert (arch["words=64"]["inner_stride"], arch["words=64"]["word_dim"]) == (1, 2)
    assert arch["no-pos"]["word_pos"] is False and arch["no-pos"]["sentence_pos"] is False
    assert all(v.cfg.train.seed == 0 and v.cfg.data.data == "digits" for v in variants.values())

    sizes = {name: size(v) for name, v in variants.items() if name in ("baseline", "no-inner", "inner-blocks=1",
                                                                      "se", "words=4", "words=64")}
    base_params, base_gmacs = sizes["baseline"]
    assert sizes["no-inner"][0] < sizes["inner-blocks=1"][0] < base_params       # fewer inner blocks, fewer params
    assert sizes["no-inner"][1] < sizes["inner-blocks=1"][1] < base_gmacs
    assert sizes["se"][0] > base_params                                           # SE adds parameters
    assert sizes["words=4"][1] != sizes["words=64"][1] != base_gmacs              # words change the compute


def test_each_position_flag_is_one_variant():
    names = [v.name for v in plan_variants(tiny_base(), AblationFlags(no_word_pos=True, no_sentence_pos=True))]
    assert names == ["baseline", "no-word-pos", "no-sentence-pos"]          # --no-pos is its own flag
    assert [v.name for v in plan_variants(tiny_base(), AblationFlags(no_pos=True))] == ["baseline", "no-pos"]


def test_words_on_tnt_s_follow_the_paper_and_pick_inner_heads_that_divide_the_word_dim():
    variants = by_name(plan_variants(build_config({}, {"data.data": "digits"}), AblationFlags(words="4,16,64")))
    w4, w64 = variants["words=4"].cfg.model.arch, variants["words=64"].cfg.model.arch
    assert (w4["inner_stride"], w4["word_dim"], w4["inner_heads"]) == (8, 96, 4)
    assert (w64["inner_stride"], w64["word_dim"], w64["inner_heads"]) == (2, 6, 3)
    assert "inner heads 3 (4 does not divide c=6)" in variants["words=64"].description
    assert variants["baseline"].same_as == ["words=16"]


def test_inner_heads_sweep_and_paper_rows():
    variants = plan_variants(build_config({}, {"data.data": "digits"}), AblationFlags(inner_heads="1,2,4,6,8"))
    assert [v.name for v in variants] == ["baseline", "inner-heads=1", "inner-heads=2", "inner-heads=6",
                                          "inner-heads=8"]
    assert [ablate.paper_row(v.paper)["top1"] for v in variants] == [81.5, 81.0, 81.4, 81.3, 81.1]


def test_vs_deit_is_the_deit_of_the_bases_width_and_depth_on_the_same_pipeline():
    variants = by_name(plan_variants(tiny_base(), AblationFlags(no_inner=True, vs_deit=True)))
    deit = variants["deit"]
    assert list(variants) == ["baseline", "no-inner", "deit"]
    assert deit.cfg.model.name == "deit-ti" and deit.paper == ("deit", "deit-ti")
    mc = ablate.model_cfg(deit.cfg, num_classes=10)
    assert (mc.depth, mc.dim, mc.heads, mc.patch_size, mc.img_size) == (2, 32, 2, 8, 16)
    assert deit.cfg.data.mean == [0.5, 0.5, 0.5] and deit.cfg.data.crop_pct == 0.9     # TNT's pipeline
    assert deit.cfg.train.seed == 0 and deit.cfg.optim.lr == 0.02


# ----------------------------------------------------------------------------------------------- runs, tables
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished two-seed --no-inner ablation of the tiny base: four real (1-epoch) runs and its results."""
    root = tmp_path_factory.mktemp("ablate")
    runs, out = root / "runs", root / "results"
    df = ablate.run(tiny_base(), AblationFlags(no_inner=True), runs=runs, out=out, seeds=SEEDS)
    return runs, out, df


def summaries(runs: Path, cell: str) -> list[dict]:
    return [json.loads((runs / p / "summary.json").read_text()) for p in cell.split(";")]


def test_table_reports_mean_std_and_seed_paired_intervals(done):
    from scipy import stats

    runs, out, _ = done
    df = pd.read_csv(out / "ablation-no-inner.csv")
    assert set(CSV_CONTRACT + ["top1_mean", "top1_std", "n_seeds", "delta_ci95_low", "delta_ci95_high",
                               "verdict"]) <= set(df.columns)
    base, variant = df.set_index("variant").loc["baseline"], df.set_index("variant").loc["no-inner"]
    base_top1 = [s["best_top1"] for s in summaries(runs, base.run_dir)]
    var_top1 = [s["best_top1"] for s in summaries(runs, variant.run_dir)]
    assert len(base_top1) == len(var_top1) == 2 and base.n_seeds == 2 and variant.seeds == "0 1"
    assert variant.top1_mean == pytest.approx(sum(var_top1) / 2, abs=0.006) and variant.top1 == variant.top1_mean
    assert variant.top1_std == pytest.approx(pd.Series(var_top1).std(), abs=0.006)
    diffs = [v - b for v, b in zip(var_top1, base_top1)]
    half = stats.t.ppf(0.975, 1) * pd.Series(diffs).std() / 2 ** 0.5
    assert variant.delta_top1 == pytest.approx(sum(diffs) / 2, abs=0.006)
    assert (variant.delta_ci95_low, variant.delta_ci95_high) == pytest.approx(
        (sum(diffs) / 2 - half, sum(diffs) / 2 + half), abs=0.006)
    expected = "better" if variant.delta_ci95_low > 0 else "worse" if variant.delta_ci95_high < 0 else "within noise"
    assert variant.verdict == expected and base.verdict == "baseline" and variant.delta_method == "t over 2 seeds"
    assert variant.params_m < base.params_m and variant.gmacs < base.gmacs
    # digits at 16px is not the paper's setting: no paper figure beside ours, and the table says why
    assert pd.isna(base.paper_top1) and base.paper_note.startswith("not the paper's setting")
    assert base.paper_note.endswith("modified architecture, 16px, digits (10 classes)")
    per_run = pd.read_csv(out / "ablation-no-inner-seeds.csv")
    assert per_run[["variant", "seed"]].values.tolist() == [["baseline", 0], ["baseline", 1], ["no-inner", 0],
                                                            ["no-inner", 1]]
    md = (out / "ablation-no-inner.md").read_text()
    assert "| baseline " in md and "Student t over the seed-paired differences" in md
    for text in (md, (out / "ablation-no-inner.csv").read_text(), per_run.to_csv()):
        assert str(runs.parent) not in text and "/tmp" not in text          # no machine paths
    for stem in ("ablation-no-inner", "ablation-no-inner-curves"):
        for ext in ("png", "svg"):
            assert (out / f"{stem}.{ext}").stat().st_size > 0


def test_each_run_saves_per_image_predictions_of_its_best_weights(done):
    runs, _, df = done
    for cell in df.run_dir:
        for path in cell.split(";"):
            preds = pd.read_csv(runs / path / "val_predictions.csv")
            summary = json.loads((runs / path / "summary.json").read_text())
            assert list(preds.columns) == ["image", "label", "pred", "correct"]
            assert 100 * preds.correct.mean() == pytest.approx(summary["best_top1"], abs=1e-6)


def test_one_seed_gets_a_bootstrap_interval_over_validation_images(done):
    runs, _, _ = done
    variants = plan_variants(tiny_base(), AblationFlags(no_inner=True))
    dirs = [[ablate.run_dir(runs, v, 0)] for v in variants]
    row = ablate.ablation_table(variants, dirs, runs).set_index("variant").loc["no-inner"]
    assert row.n_seeds == 1 and pd.isna(row.top1_std)
    assert row.delta_method.startswith("bootstrap over 360 val images")
    assert row.delta_ci95_low <= row.delta_top1 <= row.delta_ci95_high
    (runs / dirs[1][0] / "val_predictions.csv").rename(runs / dirs[1][0] / "moved.csv")
    try:
        row = ablate.ablation_table(variants, dirs, runs).set_index("variant").loc["no-inner"]
        assert row.verdict == "unknown" and pd.isna(row.delta_ci95_low) and "no interval" in row.delta_method
    finally:
        (runs / dirs[1][0] / "moved.csv").rename(runs / dirs[1][0] / "val_predictions.csv")


def test_a_second_call_reuses_finished_runs_and_trains_nothing(done, monkeypatch, tmp_path):
    runs, _, first = done
    folders = sorted(runs.iterdir())
    monkeypatch.setattr(ablate, "train", lambda *a, **k: pytest.fail("train() called for a finished run"))
    again = ablate.run(tiny_base(), AblationFlags(no_inner=True), runs=runs, out=tmp_path, seeds=SEEDS)
    assert sorted(runs.iterdir()) == folders
    pd.testing.assert_frame_equal(again, first)


def test_interrupted_runs_resume_and_empty_folders_start_over(done, monkeypatch, tmp_path):
    runs, _, first = done
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    base_dir, variant_dir = (copy / cell.split(";")[1] for cell in first.run_dir)      # seed 1 of each
    summary = json.loads((base_dir / "summary.json").read_text())
    (base_dir / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    for name in list(variant_dir.iterdir()):
        shutil.rmtree(name) if name.is_dir() else name.unlink()
    calls = []
    monkeypatch.setattr(ablate, "train", lambda cfg, **kw: calls.append((cfg.train.seed, kw)))
    dirs = ablate.train_variants(plan_variants(tiny_base(), AblationFlags(no_inner=True)), copy, SEEDS)
    assert [d[1] for d in dirs] == [base_dir, variant_dir] and len(calls) == 2      # seed 0 runs: reused
    assert calls[0] == (1, {"resume": base_dir, "console": None})
    assert calls[1] == (1, {"out": variant_dir, "overwrite": True, "console": None})


def test_dry_run_plans_every_variant_and_seed_with_measured_step_times(done, capsys):
    runs, _, _ = done
    plan = ablate.plan_table(plan_variants(tiny_base(), AblationFlags(no_inner=True, se=True)), runs,
                             timing_steps=1, seeds=[0, 1, 2])
    assert plan.variant.tolist() == ["baseline", "no-inner", "se"]
    assert (plan.step_ms > 0).all() and (plan.gmacs > 0).all()
    assert plan.run.tolist() == ["2 reuse, 1 new", "2 reuse, 1 new", "3 new"]      # seed 2 and se never trained
    assert plan.runs_left.tolist() == [1, 1, 3] and plan.epochs_left.tolist() == [1, 1, 3]
    assert plan.est_minutes.iloc[2] == pytest.approx(3 * 2 * plan.step_ms.iloc[2] / 1000 / 60, abs=0.01)
    line = ablate.plan_summary(plan, 1)
    assert line.startswith(f"plan: 5 runs to train, 5 epochs in all; estimated training time "
                           f"{plan.est_minutes.sum():.1f} min")


def test_seeds_flag_counts_from_the_seed_or_lists_seeds():
    from tntcli.errors import TntError
    from tntcli.seeds import parse_seeds

    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("2", first=5) == [5, 6]
    assert parse_seeds("4,1,7") == [4, 1, 7] and parse_seeds(None) is None
    for bad, message in (("0", "at least 1"), ("1,1", "twice"), ("a", "a count"), (",", "empty")):
        with pytest.raises(TntError, match=message):
            parse_seeds(bad)


def _fake_run(folder: Path, summary: dict, config: str, top1: float, seed: int = 0) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(config + f"train:\n  seed: {seed}\n")
    (folder / "metrics.csv").write_text("epoch,train_loss,val_top1,img_per_s\n1,2.3,11.0,100.0\n2,2.2,12.5,140.0\n")
    (folder / "summary.json").write_text(json.dumps({**summary, "best_top1": top1, "epochs_done": 1}))
    return folder


def test_results_pairs_tnt_with_its_deit_baseline_over_seeds_and_leaves_variants_out(done, tmp_path,
                                                                                     monkeypatch):
    runs, _, first = done
    base_dirs = first.run_dir.iloc[0].split(";")
    summary = json.loads((runs / base_dirs[0] / "summary.json").read_text())
    deit_arch = "model:\n  name: deit-ti\n  arch: {depth: 2, patch_size: 8, dim: 32, heads: 2}\n"
    scratch = tmp_path / "runs"
    shutil.copytree(runs, scratch)
    for seed, top1 in ((0, 12.5), (1, 14.5)):                 # a finished same-size DeiT per seed, same data
        _fake_run(scratch / f"deit-s{seed}", {**summary, "model": "deit-ti"}, deit_arch, top1, seed)
    _fake_run(scratch / "transfer-run", {**summary, "model": "tnt-ti"},          # fine-tuned: not a training run
              "model:\n  name: tnt-ti\n  pretrained: pre/last.pt\n", 99.0)
    from typer.testing import CliRunner

    from tntcli.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["results", "--runs", str(scratch)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "results"                         # ad-hoc output stays out of results/
    df = pd.read_csv(out / "comparison.csv")
    ours = df[df.top1.notna()]
    assert ours.model.tolist() == ["tnt-ti", "deit-ti"]         # no-inner variants and the transfer run left out
    tnt, deit = ours.iloc[0], ours.iloc[1]
    tnt_top1 = [s["best_top1"] for s in summaries(scratch, tnt.run_dir)]
    assert tnt.run_dir == first.run_dir.iloc[0] and tnt.baseline == "deit-ti" and tnt.n_seeds == 2
    assert deit.top1_mean == 13.5 and deit.top1_std == 1.41
    assert tnt.delta_top1_vs_baseline == pytest.approx((tnt_top1[0] - 12.5 + tnt_top1[1] - 14.5) / 2, abs=0.006)
    assert tnt.delta_ci95_low < tnt.delta_top1_vs_baseline < tnt.delta_ci95_high
    assert deit.img_per_s == 120.0 and pd.isna(tnt.paper_top1) and "modified architecture" in tnt.paper_note
    paper_only = df[df.data == "(no run)"].set_index("model")
    assert paper_only.loc["tnt-s", "paper_top1"] == 81.5
    assert paper_only.loc["tnt-s", "paper_delta_top1_vs_baseline"] == 1.7                  # 81.5 - DeiT-S 79.8
    text = (out / "comparison.md").read_text() + (out / "comparison.csv").read_text()
    assert str(tmp_path) not in text and "/tmp" not in text
    for stem in ("comparison", "comparison-curves"):
        assert (out / f"{stem}.png").is_file() and (out / f"{stem}.svg").is_file()


# ----------------------------------------------------------------------------------------------- bad input
BAD = [
    (["--no-inner", "--inner-heads", "2"], "--no-inner removes the inner transformer"),
    (["--inner-blocks", "0"], "--inner-blocks 0 is out of range: blocks are numbered 1 to 4"),
    (["--inner-blocks", "1,5"], "--inner-blocks 5 is out of range"),
    (["--words", "5"], "--words 5 is not a square number"),
    (["--words", "9"], "does not tile the 8px patch"),
    (["--inner-heads", "5"], "--inner-heads 5 does not divide the word dim 12"),
    (["--inner-heads", "two"], "--inner-heads expects comma-separated whole numbers"),
    (["--model", "deit-s", "--se"], "deit-s has no inner transformer"),
    (["--no-inner", "--seeds", "0"], "the number of seeds must be at least 1"),
    (["--no-inner", "--seed", "1", "--seeds", "2,3"], "not both"),
    ([], "no ablation given"),
    (["--no-outer"], "No such option: --no-outer"),
]


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tntcli.cli", "ablate", "--recipe", "quickstart", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


@pytest.mark.slow                                                  # a fresh interpreter imports torch: ~2 s
def test_contradictory_flags_exit_with_one_line_through_python_m_tntcli_cli():
    proc = run_cli(BAD[0][0])
    message = BAD[0][1]
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,message", BAD[1:], ids=[" ".join(a) or "none" for a, _ in BAD[1:]])
def test_bad_flags_exit_with_one_line(args, message, monkeypatch, capsys):
    """The same entry point in-process (a subprocess per case would cost seconds of imports each)."""
    from tntcli.cli import main

    monkeypatch.setattr(sys, "argv", ["tnt", "ablate", "--recipe", "quickstart", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip().count("\n") == 0 and message in err, err


def test_ad_hoc_tables_default_outside_the_committed_results_folder():
    """A user's `tnt ablate` / `tnt results` / `tnt transfer --table` in a clone never replaces results/ files."""
    import typer

    from tntcli.cli import app

    commands = typer.main.get_command(app).commands
    defaults = {(name, p.name): p.default for name, option in (("ablate", "out"), ("results", "out"),
                                                               ("transfer", "results"))
                for p in commands[name].params if p.name == option}
    assert set(defaults.values()) == {Path("runs/results")}, defaults
    assert set(defaults) == {("ablate", "out"), ("results", "out"), ("transfer", "results")}
