"""`tnt bench` runs and records honestly; the fast model paths compute what the reference paths compute.

Benchmarks are not tests: nothing here checks a speed. Models are tiny (or one block deep) and run one repetition.
"""
from __future__ import annotations

import sys

import pandas as pd
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from tntcli import bench
from tntcli.cli import app
from tntcli.errors import TntError
from tntcli.models import create_model, layers

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
    assert set(steps) == ({"aten", "oneDNN"} if layers.ONEDNN_LINEAR else {"aten"})
    products = [step() for step in steps.values()]
    for p in products[1:]:
        torch.testing.assert_close(p, products[0], rtol=1e-4, atol=1e-4)


# results/bench.csv's columns (a contract: README and benchmarks/README.md read them); new ones go at the end.
BENCH_CSV_COLUMNS = ["time", "model", "impl", "mode", "batch", "precision", "compile", "isolate", "grad_checkpointing",
                     "arch", "device", "device_name", "torch", "threads", "reps", "img_per_s", "img_per_s_min",
                     "img_per_s_max", "spread", "vs_timm", "vs_reference", "peak_mem_mb", "mem_source", "gmacs_per_img",
                     "achieved_gmacs_per_s", "gemm_size", "gemm_gmacs_per_s", "frac_of_gemm", "max_abs_diff_vs_ours"]


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


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the linear products that run on oneDNN, so a test can tell which path really ran."""
    calls = []
    real = layers.onednn_linear

    def counting(*args, **kw):
        calls.append(args[0].shape)
        return real(*args, **kw)

    monkeypatch.setattr(layers, "onednn_linear", counting)
    return calls


@pytest.mark.parametrize("name", ["tnt-ti", "deit-ti"])
def test_fast_inference_path_gives_the_reference_logits(name, onednn_calls):
    """CPU inference: oneDNN linears with GELU fused, and a last layer that computes the class token only."""
    arch = {**TINY, "depth": 2} if name == "tnt-ti" else {"depth": 2, "dim": 48, "heads": 3, "img_size": 32,
                                                          "num_classes": 10}
    torch.manual_seed(0)
    model = create_model(name, **arch).eval()
    x = torch.randn(3, 3, arch["img_size"], arch["img_size"])
    with torch.inference_mode():
        fast = model(x)
        taken = len(onednn_calls)
        with layers.reference_mode():
            reference = model(x)
    assert taken > 0 and len(onednn_calls) == taken                      # fast path ran; reference did not
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("onednn_weight_grad", [False, True], ids=["mkl-wgrad", "onednn-wgrad"])
def test_fast_training_path_gives_the_reference_gradients(onednn_calls, monkeypatch, onednn_weight_grad):
    """CPU training: oneDNN linears forward and backward (weight gradients on either library: which one serves
    depends on the CPU), explicit attention for the inner transformer's tiny heads (head dim 4 here),
    class-token-only last layer. Drop-path masks are replayed by seed; dropout is off, as the last layer draws
    its masks for the class row only."""
    monkeypatch.setattr(layers, "_ONEDNN_WEIGHT_GRAD", onednn_weight_grad)
    model = create_model("tnt-ti", **{**TINY, "depth": 2, "drop_path_rate": 0.2}).train()
    assert_fast_path_gives_reference_gradients(model, lambda: onednn_calls)


@pytest.mark.parametrize("onednn", [False, True], ids=["mkl", "onednn"])
@pytest.mark.parametrize("out_features, in_features", [(24, 96), (96, 24)])
def test_weight_gradient_is_grad_transposed_times_input(onednn_calls, monkeypatch, onednn, out_features,
                                                        in_features):
    """Both orientations of the oneDNN weight gradient (the wider dimension as the product's columns) and MKL's."""
    monkeypatch.setattr(layers, "_ONEDNN_WEIGHT_GRAD", onednn)
    grad, x = torch.randn(500, out_features), torch.randn(500, in_features)
    w = layers._weight_grad(grad, x)
    assert w.shape == (out_features, in_features) and w.is_contiguous()
    assert len(onednn_calls) == int(onednn)
    torch.testing.assert_close(w.double(), grad.double().t() @ x.double(), rtol=1e-5, atol=1e-4)


def assert_fast_path_gives_reference_gradients(model, fast_path_calls) -> None:
    """Logits and every parameter gradient of a training step, fast path vs `reference_mode` (same seed)."""
    x = torch.randn(4, 3, 16, 16)

    def logits_and_grads():
        model.zero_grad()
        torch.manual_seed(1)
        out = model(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fast, fast_grads = logits_and_grads()
    assert fast_path_calls(), "the fast path did not run"
    with layers.reference_mode():
        reference, reference_grads = logits_and_grads()
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    for n, g in reference_grads.items():
        torch.testing.assert_close(fast_grads[n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_autocast_and_tracing_take_the_plain_path(onednn_calls):
    model = create_model("tnt-ti", **TINY).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x).dtype == torch.bfloat16
        torch.jit.trace(model, x, check_trace=False)
    assert onednn_calls == []


def test_cls_only_layer_returns_the_full_layers_class_row_but_not_with_se():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 32)
    for se, rows in ((False, 1), (True, 9)):
        layer = layers.TransformerLayer(32, 2, se=se).eval()
        with torch.no_grad():
            full, first = layer(x), layer(x, cls_only=True)
        assert first.shape == (2, rows, 32)
        torch.testing.assert_close(first[:, 0], full[:, 0], rtol=1e-5, atol=1e-6)


def test_flop_count_is_the_nominal_cost_of_every_token():
    """`cls_only` saves work at run time, but FLOPs are counted for the architecture (as papers do)."""
    from tntcli.flops import count_macs
    model = create_model("deit-ti", depth=2, dim=48, heads=3, img_size=32, num_classes=10)
    with layers.reference_mode():
        reference = count_macs(model, 32).total()
    assert count_macs(model, 32).total() == reference


@pytest.fixture
def compile_any_size(monkeypatch):
    """Compile the inner transformer whatever its size (tests use tiny models)."""
    monkeypatch.setattr(layers, "_COMPILE_MIN_ROWS", 1)
    monkeypatch.setattr(layers, "_compile_failed", False)
    monkeypatch.delenv("TNT_CPU_COMPILE", raising=False)


@pytest.fixture
def compiled_calls(compile_any_size, monkeypatch):
    """Record the input shape of each compiled call of the inner transformer."""
    calls, real = [], layers._compiled_apply()

    def counting(layer, x):
        calls.append(tuple(x.shape))
        return real(layer, x)

    monkeypatch.setattr(layers, "_compiled_apply", lambda: counting)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_inner_transformer_gives_the_reference_gradients(compiled_calls, checkpointing, monkeypatch):
    """CPU training compiles the inner transformer (inductor fuses its memory-bound passes; its skinny linears run on
    oneDNN as one opaque op, or as row blocks); logits and every gradient stay those of the reference path, with
    activation checkpointing too."""
    skinny, real = [], layers._compiled_skinny_linear

    def counting(x, weight, bias):
        skinny.append(tuple(weight.shape))
        return real(x, weight, bias)

    monkeypatch.setattr(layers, "_compiled_skinny_linear", counting)
    model = create_model("tnt-ti", **{**TINY, "depth": 2}).train()       # 4 images x 4 patches x 4 words = 64 rows
    model.set_grad_checkpointing(checkpointing)
    assert_fast_path_gives_reference_gradients(model, lambda: compiled_calls and skinny)


@pytest.mark.parametrize("kind", ["row_blocks", "onednn_op", "onednn_op_compiled"])
def test_compiled_skinny_linear_gives_the_linears_output_and_gradients(kind):
    if kind != "row_blocks" and not layers.ONEDNN_LINEAR:
        pytest.skip("this torch has no oneDNN linear")
    torch.manual_seed(0)
    x, weight, bias = (torch.randn(*shape, requires_grad=True) for shape in ((8, 16, 24), (96, 24), (96,)))
    skinny = {"row_blocks": layers._row_blocked_linear, "onednn_op": layers._onednn_linear_op,
              "onednn_op_compiled": torch.compile(layers._onednn_linear_op, fullgraph=True)}[kind]
    y = skinny(x, weight, bias)
    grads = torch.autograd.grad(y.square().sum(), (x, weight, bias))
    plain = F.linear(x, weight, bias)
    for got, want in zip(grads, torch.autograd.grad(plain.square().sum(), (x, weight, bias))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y, plain)


@pytest.mark.skipif(not layers.ONEDNN_LINEAR, reason="this torch has no oneDNN linear")
def test_onednn_custom_op_passes_torchs_operator_checks():
    # Fake (meta) shapes, schema and autograd registration as torch.compile relies on them.
    x, weight, bias = torch.randn(128, 24), torch.randn(96, 24, requires_grad=True), torch.randn(96)
    for args in ((x, weight, bias), (x.requires_grad_(), weight, None)):
        torch.library.opcheck(layers._onednn_linear_op, args)


def test_inner_transformer_is_compiled_only_for_large_cpu_training(compiled_calls, monkeypatch):
    model = create_model("tnt-ti", **{**TINY, "depth": 1})
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model.train()(x)                                   # no gradients: eager
    monkeypatch.setenv("TNT_CPU_COMPILE", "0")
    model(x).sum().backward()                              # switched off: eager
    monkeypatch.setattr(layers, "_COMPILE_MIN_ROWS", 10**6)
    monkeypatch.delenv("TNT_CPU_COMPILE")
    model(x).sum().backward()                              # below the size threshold: eager
    assert compiled_calls == []


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(compile_any_size, monkeypatch, caplog):
    attempts = []

    def broken(layer, x):
        attempts.append(1)
        raise RuntimeError("no C++ compiler found\nlong details")

    monkeypatch.setattr(layers, "_compiled_apply", lambda: broken)
    layer = layers.TransformerLayer(8, 2).train()
    x = torch.randn(3, 5, 8, requires_grad=True)
    with caplog.at_level("WARNING", logger=layers.__name__):
        first, second = layer(x), layers.apply_layer(layer, x)
        outputs = [layers.apply_layer(layer, x) for _ in range(2)]
    for out in (second, *outputs):
        torch.testing.assert_close(out, first)
    assert attempts == [1]                                 # tried once, then eager for good
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile of the inner transformer failed, running it eagerly: no C++ compiler found"]
