"""`tnt bench` runs and records honestly (the speed paths' parity with the plain model: test_backends.py).

Benchmarks are not tests: nothing here checks a speed. Models are tiny (or one block deep) and run one repetition.
"""
from __future__ import annotations

import sys

import pandas as pd
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tntcli import bench
from tntcli.cli import app
from tntcli.errors import TntError
from tntcli.backends.cpu import ONEDNN_LINEAR
from tntcli.models import create_model

TINY = {"depth": 1, "patch_size": 8, "inner_stride": 4, "dim": 32, "heads": 2, "word_dim": 8, "inner_heads": 2,
        "img_size": 16, "num_classes": 10}


def options(**kw) -> bench.BenchOptions:
    base = dict(models=["tnt-ti"], batch_size=2, reps=1, warmup=0, device="cpu", gemm_size=64, arch=TINY,
                min_rep_seconds=0,
                measure_memory=False)
    return bench.BenchOptions(**{**base, **kw})


# ------------------------------------------------------------------------------------------ the benchmark runs
def test_gemm_reference_runs_the_same_product_on_each_cpu_library():
    steps = bench.gemm_steps(torch.device("cpu"), "fp32", 64)
    assert set(steps) == ({"aten", "oneDNN"} if ONEDNN_LINEAR else {"aten"})
    products = [step() for step in steps.values()]
    for p in products[1:]:
        torch.testing.assert_close(p, products[0], rtol=1e-4, atol=1e-4)


# results/bench.csv's columns (a contract: README and benchmarks/README.md read them); new ones go at the end.
BENCH_CSV_COLUMNS = ["time", "model", "impl", "mode", "batch", "precision", "compile", "isolate", "grad_checkpointing",
                     "arch", "device", "device_name", "torch", "threads", "reps", "img_per_s", "img_per_s_min",
                     "img_per_s_max", "spread", "vs_timm", "vs_reference", "peak_mem_mb", "mem_source", "gmacs_per_img",
                     "achieved_gmacs_per_s", "gemm_size", "gemm_gmacs_per_s", "frac_of_gemm", "max_abs_diff_vs_ours",
                     "tf32", "drop_path"]


def test_the_committed_bench_csv_has_every_contract_column():
    committed = pd.read_csv(Path(__file__).resolve().parent.parent / "results" / "bench.csv", nrows=0)
    assert set(committed.columns) == set(BENCH_CSV_COLUMNS)


def test_library_times_both_modes_and_reports_memory_and_gemm_fraction():
    records = bench.run_bench(options())
    assert [(r["impl"], r["mode"]) for r in records] == [("tntcli", "infer"), ("tntcli", "train")]
    for r in records:
        assert r["img_per_s_min"] <= r["img_per_s"] <= r["img_per_s_max"] and r["img_per_s"] > 0
        assert r["gemm_gmacs_per_s"] > 0 and r["gmacs_per_img"] > 0
        assert r["frac_of_gemm"] == pytest.approx(r["achieved_gmacs_per_s"] / r["gemm_gmacs_per_s"], rel=0.02)
        assert r["peak_mem_mb"] is None and r["mem_source"] == "off"
        assert r["device"] == "cpu" and r["threads"] == torch.get_num_threads() and r["vs_timm"] is None
    infer, train = records
    assert train["achieved_gmacs_per_s"] == pytest.approx(3 * train["gmacs_per_img"] * train["img_per_s"], rel=0.02)
    assert infer["achieved_gmacs_per_s"] == pytest.approx(infer["gmacs_per_img"] * infer["img_per_s"], rel=0.02)


def test_records_state_tf32_and_size_the_gemm_for_the_device():
    (record,) = bench.run_bench(options(gemm_size=None, modes=("infer",)))
    assert record["gemm_size"] == bench.GEMM_SIZES["cpu"] and record["tf32"] == "n/a"
    assert list(record)[-2:] == ["tf32", "drop_path"]                   # new columns go at the end
    assert record["drop_path"] == 0.1                                   # the paper recipe's, unless told


@pytest.mark.slow                                                       # the profiler's first start costs ~20 s
def test_cpu_peak_memory_counts_what_a_step_allocates():
    peak, source = bench.peak_memory_mb(lambda: torch.ones(64, 2 ** 20).sum(), torch.device("cpu"))   # 256 MiB
    assert source == "profiler memory timeline" and 256 <= peak < 256 + 64


def test_cli_times_timm_with_our_weights_and_our_reference_path_and_appends_csv_rows(tmp_path):
    args = ["bench", "--model", "tnt-s", "--depth", "1", "--batch-size", "1", "--reps", "1", "--warmup", "0",
            "--mode", "infer", "--vs", "timm", "--vs", "reference", "--no-memory", "--gemm-size", "64",
            "--device", "cpu", "--results", str(tmp_path)]
    for _ in range(2):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    df = pd.read_csv(tmp_path / "bench.csv")
    assert df.impl.tolist() == ["tntcli", "reference", "timm"] * 2     # appended, one header
    ours = df[df.impl == "tntcli"]
    for impl in ("timm", "reference"):
        other = df[df.impl == impl]
        assert (other.max_abs_diff_vs_ours <= 1e-5).all()               # all compute the same function
        assert ours[f"vs_{impl}"].tolist() == pytest.approx((ours.img_per_s.values / other.img_per_s.values).tolist(),
                                                            rel=0.01)
    assert df.columns.tolist() == BENCH_CSV_COLUMNS                     # the whole contract, in order
    assert "x timm" in result.output and "x ref" in result.output and "GEMM 64^3" in result.output


@pytest.mark.slow                                                      # four child processes import torch
def test_isolated_timing_runs_each_repetition_in_a_fresh_process(monkeypatch):
    """--isolate: the parent never runs a contestant's step; children do, and their timings are recorded."""
    monkeypatch.setattr(bench, "make_step", lambda *a, **k: pytest.fail("the parent ran a step"))
    records = bench.run_bench(options(modes=("train",), reps=2, warmup=1, isolate=True, vs_reference=True))
    assert [(r["impl"], r["reps"], r["isolate"]) for r in records] == [("tntcli", 2, True), ("reference", 2, True)]
    assert all(r["img_per_s"] > 0 for r in records) and records[0]["vs_reference"] > 0


@pytest.mark.parametrize("kw, message", [
    (dict(precision="fp8"), "unknown precision 'fp8'"),
    (dict(modes=("eval",)), "unknown mode"),
    (dict(device="tpu"), "unknown device 'tpu'|only cpu and cuda"),
    (dict(vs_timm=True), "tnt-ti has no timm counterpart"),
    (dict(models=["tnt-s"], vs_timm=True, arch={"depth": 1, "dim": 48}), "can only reduce depth"),
    (dict(models=["tnt-xl"]), "unknown model 'tnt-xl'"),
])
def test_bad_options_are_one_line_user_errors(kw, message):
    with pytest.raises(TntError, match=message):
        bench.run_bench(options(**kw))


def test_missing_timm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)                     # makes `import timm` raise ImportError
    with pytest.raises(TntError, match="needs the timm package"):
        bench.run_bench(options(models=["tnt-s"], vs_timm=True, arch={"depth": 1}))


def test_cli_refuses_an_unknown_comparison():
    result = CliRunner().invoke(app, ["bench", "--vs", "onnx"])
    assert isinstance(result.exception, TntError) and "--vs accepts 'timm' and 'reference'" in str(result.exception)


# ------------------------------------------------------------------------------------------ fast == reference
def test_grad_checkpointing_gives_the_same_logits_and_gradients():
    torch.manual_seed(0)
    model = create_model("tnt-ti", **{**TINY, "depth": 2, "drop_path_rate": 0.2}).train()
    x = torch.randn(4, 3, 16, 16)

    def logits_and_grads(checkpointing: bool):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad()
        torch.manual_seed(1)                                            # same drop-path masks in both runs
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    (a, ga), (b, gb) = logits_and_grads(False), logits_and_grads(True)
    torch.testing.assert_close(a, b)
    for p, q in zip(ga, gb):
        torch.testing.assert_close(p, q)


def test_word_stem_gives_row_major_words_equal_to_a_per_patch_unfold_and_conv():
    """The stem's output must be contiguous (a strided view costs a hidden copy in every inner block) and equal
    the official per-patch computation: unfold 16x16 patches, convolve each with zero padding at its border."""
    model = create_model("tnt-s", depth=1).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        words = model.word_embed(x)
        patches = torch.nn.functional.unfold(x, 16, stride=16).transpose(1, 2).reshape(-1, 3, 16, 16)
        reference = model.word_embed.proj(patches).flatten(2).transpose(1, 2)
    assert words.is_contiguous()
    torch.testing.assert_close(words, reference, rtol=0, atol=0)
