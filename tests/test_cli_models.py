"""`tnt flops` on the command line: the tables it writes and the one-line errors of `main()`."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from tntcli.cli import app
from tntcli.errors import TntError

from test_flops import closed_form

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def tnt(*args: str):
    """Run the typer app in-process and expect success."""
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_flops_writes_a_csv_and_a_markdown_table(tmp_path):
    result = tnt("flops", "--model", "tnt-ti", "--out", str(tmp_path))
    df = pd.read_csv(tmp_path / "flops.csv")
    assert {"model", "params_m", "gmacs", "paper_params_m", "paper_gmacs"} <= set(df.columns)
    row = df.iloc[0]
    assert row.model == "tnt-ti" and len(df) == 1
    params, macs = closed_form("tnt-ti")                                 # Eq. 17/18 and the rest, in test_flops
    assert (row.params_m, row.gmacs) == (round(params / 1e6, 3), round(macs / 1e9, 3))
    assert (row.paper_params_m, row.paper_gmacs) == (6.1, 1.4)           # the paper, Sec. 3.2
    md = (tmp_path / "flops.md").read_text()
    assert md.startswith("# Params and GMACs at 224px") and "| tnt-ti " in md and "paper's printed figures" in md
    assert "tnt-ti" in result.output and "flops.csv" in result.output


def test_flops_at_another_resolution_writes_its_own_files_without_paper_figures(tmp_path):
    tnt("flops", "--model", "tnt-ti", "--img-size", "384", "--out", str(tmp_path))
    assert sorted(p.name for p in tmp_path.glob("flops*")) == ["flops-384.csv", "flops-384.md"]
    row = pd.read_csv(tmp_path / "flops-384.csv").iloc[0]
    assert row.img_size == 384 and row.gmacs == round(closed_form("tnt-ti", img_size=384)[1] / 1e9, 3)
    assert pd.isna(row.paper_params_m) and pd.isna(row.paper_gmacs)


def test_flops_by_module_prints_where_the_macs_go(tmp_path):
    result = tnt("flops", "--model", "tnt-ti", "--by-module", "--out", str(tmp_path))
    assert "tnt-ti: GMACs by module (224px)" in result.output
    assert "blocks.*.inner" in result.output and "blocks.*.outer" in result.output


def test_repeating_a_model_gives_one_row(tmp_path):
    tnt("flops", "-m", "tnt-ti", "-m", "deit-ti", "-m", "tnt-ti", "--out", str(tmp_path))
    assert pd.read_csv(tmp_path / "flops.csv").model.tolist() == ["tnt-ti", "deit-ti"]


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("args, message", [
    ([], "name a model with --model"),
    (["--model", "tnt-s", "--img-size", "100"], "img_size 100 must be a positive multiple of the patch size 16"),
], ids=["no model", "bad img size"])
def test_user_mistakes_raise_a_tnt_error_before_writing_anything(tmp_path, args, message):
    result = runner.invoke(app, ["flops", *args, "--out", str(tmp_path)])
    assert isinstance(result.exception, TntError) and message in str(result.exception)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--model", "tnt-xl"], "unknown model 'tnt-xl'; choose one of: tnt-ti, tnt-s, tnt-b"),
    (["--bogus"], "No such option: --bogus"),
], ids=["unknown model", "unknown option"])
def test_main_prints_one_error_line_without_traceback_and_exits_2(tmp_path, args, message, tnt_main):
    """The console entry point `main()` (in-process: its user-error and click-usage-error branches)."""
    proc = tnt_main("flops", *args, "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: ") and message in proc.stderr


@pytest.mark.slow                                                  # a fresh interpreter imports torch: ~2 s
def test_python_m_tntcli_cli_exits_2_with_one_error_line_from_a_fresh_process(tmp_path):
    """`python -m tntcli.cli` (the module's __main__ guard calls main()): the real process exit code and stderr,
    nothing else printed on start-up. The suite's one fresh-interpreter check of an error exit."""
    proc = subprocess.run([sys.executable, "-m", "tntcli.cli", "flops", "--model", "tnt-xl", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()
    assert proc.stdout == "" and line.startswith("error: unknown model 'tnt-xl'; choose one of: tnt-ti, tnt-s, tnt-b")


def test_loading_the_command_line_does_not_import_torch():
    """`tnt --help`, `tnt results` and every one-line error stay quick: torch (about 2 s to import) is loaded by
    the commands that use it, not by the CLI module or the recipe declarations its flags come from."""
    proc = subprocess.run([sys.executable, "-c", "import sys, tntcli.cli; print('torch' in sys.modules)"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr
