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
                                                                no_sentence_pos=True)))
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


# ----------------------------------------------------------------------------------------------- runs, tables
@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished --no-inner ablation of the tiny base: two real (1-epoch) runs and its results."""
    root = tmp_path_factory.mktemp("ablate")
    runs, out = root / "runs", root / "results"
    df = ablate.run(tiny_base(), AblationFlags(no_inner=True), runs=runs, out=out)
    return runs, out, df


def test_table_and_plots_follow_the_csv_contract(done):
    runs, out, _ = done
    df = pd.read_csv(out / "ablation-no-inner.csv")
    assert set(CSV_CONTRACT) <= set(df.columns)
    base, variant = df.set_index("variant").loc["baseline"], df.set_index("variant").loc["no-inner"]
    for row in (base, variant):
        summary = json.loads((Path(row.run_dir) / "summary.json").read_text())
        metrics = pd.read_csv(Path(row.run_dir) / "metrics.csv")
        assert row.top1 == summary["best_top1"] and row.params_m == summary["params_m"]
        assert row.img_per_s == pytest.approx(metrics.img_per_s.median(), abs=0.051)
    assert base.delta_top1 == 0 and variant.delta_top1 == pytest.approx(variant.top1 - base.top1, abs=0.006)
    assert variant.params_m < base.params_m and variant.gmacs < base.gmacs
    assert base.paper_top1 == 81.5 and pd.isna(variant.paper_top1)         # the paper has no TNT-S without inner
    md = (out / "ablation-no-inner.md").read_text()
    assert "| baseline " in md and "the paper's figures" in md and "median over epochs of metrics.csv" in md
    for stem in ("ablation-no-inner", "ablation-no-inner-curves"):
        for ext in ("png", "svg"):
            assert (out / f"{stem}.{ext}").stat().st_size > 0


def test_a_second_call_reuses_finished_runs_and_trains_nothing(done, monkeypatch, tmp_path):
    runs, _, first = done
    folders = sorted(runs.iterdir())
    monkeypatch.setattr(ablate, "train", lambda *a, **k: pytest.fail("train() called for a finished run"))
    again = ablate.run(tiny_base(), AblationFlags(no_inner=True), runs=runs, out=tmp_path)
    assert sorted(runs.iterdir()) == folders
    pd.testing.assert_frame_equal(again, first)


def test_interrupted_runs_resume_and_empty_folders_start_over(done, monkeypatch, tmp_path):
    runs, _, first = done
    copy = tmp_path / "runs"
    shutil.copytree(runs, copy)
    base_dir, variant_dir = (copy / Path(p).name for p in first.run_dir)
    summary = json.loads((base_dir / "summary.json").read_text())
    (base_dir / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    for name in list(variant_dir.iterdir()):
        shutil.rmtree(name) if name.is_dir() else name.unlink()
    calls = []
    monkeypatch.setattr(ablate, "train", lambda cfg, **kw: calls.append(kw))
    dirs = ablate.train_variants(plan_variants(tiny_base(), AblationFlags(no_inner=True)), copy)
    assert dirs == [base_dir, variant_dir] and len(calls) == 2
    assert calls[0] == {"resume": base_dir, "console": None}
    assert calls[1] == {"out": variant_dir, "overwrite": True, "console": None}


def test_dry_run_plans_every_variant_with_measured_step_times(done):
    runs, _, _ = done
    plan = ablate.plan_table(plan_variants(tiny_base(), AblationFlags(no_inner=True, se=True)), runs, timing_steps=1)
    assert plan.variant.tolist() == ["baseline", "no-inner", "se"]
    assert (plan.step_ms > 0).all() and (plan.gmacs > 0).all()
    assert plan.run.str.startswith("reuse").tolist() == [True, True, False]     # se was never trained
    assert plan.epochs_left.tolist() == [0, 0, 1] and plan.est_minutes.tolist()[:2] == [0, 0]
    assert plan.est_minutes.iloc[2] == pytest.approx(2 * plan.step_ms.iloc[2] / 1000 / 60, abs=0.01)  # 2 steps


def test_results_pairs_tnt_with_its_deit_baseline_and_leaves_variants_out(done, tmp_path):
    runs, _, first = done
    base_dir = Path(first.run_dir.iloc[0])
    deit = runs / "deit-run"                  # a finished DeiT run of the same size on the same data
    deit.mkdir()
    (deit / "config.yaml").write_text("model:\n  name: deit-ti\n  arch: {depth: 2, patch_size: 8, dim: 32, heads: 2}\n")
    (deit / "metrics.csv").write_text("epoch,train_loss,val_top1,img_per_s\n1,2.3,11.0,100.0\n2,2.2,12.5,140.0\n")
    summary = json.loads((base_dir / "summary.json").read_text())
    (deit / "summary.json").write_text(json.dumps({**summary, "model": "deit-ti", "best_top1": 12.5,
                                                   "epochs_done": 2}))
    from typer.testing import CliRunner

    from tntcli.cli import app

    result = CliRunner().invoke(app, ["results", "--runs", str(runs), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(tmp_path / "comparison.csv")
    ours = df[df.top1.notna()]
    assert ours.model.tolist() == ["tnt-ti", "deit-ti"]                       # the no-inner variant is left out
    tnt = ours.iloc[0]
    assert tnt.run_dir == str(base_dir) and tnt.baseline == "deit-ti"
    assert tnt.delta_top1_vs_baseline == pytest.approx(tnt.top1 - 12.5)
    assert ours.iloc[1].img_per_s == 120.0 and pd.isna(tnt.paper_top1)        # modified arch: no paper figure
    paper_only = df[df.data == "(no run)"].set_index("model")
    assert paper_only.loc["tnt-s", "paper_top1"] == 81.5
    assert paper_only.loc["tnt-s", "paper_delta_top1_vs_baseline"] == 1.7                  # 81.5 - DeiT-S 79.8
    for stem in ("comparison", "comparison-curves"):
        assert (tmp_path / f"{stem}.png").is_file() and (tmp_path / f"{stem}.svg").is_file()


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
    ([], "no ablation given"),
    (["--no-outer"], "No such option: --no-outer"),
]


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tntcli.cli", "ablate", "--recipe", "quickstart", *args],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


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
