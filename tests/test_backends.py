"""Backends (tntcli/backends): each speed path computes what the plain model computes, is taken where it applies and
nowhere else, and leaves the model's weights and names alone. The plain model is the reference."""
from __future__ import annotations

import copy
import logging
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tntcli.backends import apply_backend, common, cpu, cuda, kernels, resolve
from tntcli.errors import TntError
from tntcli.models import create_model
from tntcli.models.layers import TransformerLayer

TINY = {"depth": 2, "patch_size": 8, "inner_stride": 4, "dim": 32, "heads": 2, "word_dim": 8, "inner_heads": 2,
        "img_size": 16, "num_classes": 10}                     # 4 patches of 4 words, inner head dim 4
CPU = torch.device("cpu")


def fast_copy(model, training: bool, backend: str = "cpu-fast", batch_size: int = 4):
    fast = copy.deepcopy(model)
    apply_backend(fast, backend, device=CPU, training=training, batch_size=batch_size)
    return fast


def logits_and_grads(model, x):
    model.zero_grad()
    torch.manual_seed(1)                                       # the same drop-path masks in every run
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_logits_and_grads(fast, plain, x) -> None:
    (got, got_grads), (want, want_grads) = logits_and_grads(fast, x), logits_and_grads(plain, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for n, g in want_grads.items():
        torch.testing.assert_close(got_grads[n], g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.fixture
def onednn_calls(monkeypatch):
    """Counts the linear products that run on oneDNN, so a test can tell which path really ran."""
    if not cpu.ONEDNN_LINEAR:
        pytest.skip("this torch has no oneDNN linear")
    calls, real = [], cpu.onednn_linear

    def counting(*args, **kw):
        calls.append(args[0].shape)
        return real(*args, **kw)

    monkeypatch.setattr(cpu, "onednn_linear", counting)
    return calls


# ------------------------------------------------------------------------------------------ the seam
def test_model_files_hold_no_device_dtype_or_environment_checks():
    """The models are plain math: every speed path lives in tntcli/backends."""
    pattern = re.compile(r"os\.environ|device\.type|mkldnn|_cpu_fp32|is_compiling|is_tracing")
    models = Path(__file__).resolve().parent.parent / "tntcli" / "models"
    hits = [f"{p.name}:{i}" for p in sorted(models.glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


@pytest.mark.parametrize("name, device, dtype, want", [
    ("auto", "cpu", None, "cpu-fast"), ("auto", "cpu", torch.bfloat16, "reference"), ("auto", "cuda", None, "cuda"),
    ("auto", "cuda", torch.bfloat16, "cuda"), ("reference", "cuda", None, "reference"),
    ("cpu-eager", "cpu", None, "cpu-eager")])
def test_auto_picks_the_backend_for_the_device_and_precision(name, device, dtype, want):
    assert resolve(name, torch.device(device), dtype) == want


@pytest.mark.parametrize("name, device, dtype, message", [
    ("cpu-fast", "cpu", torch.bfloat16, "runs on CPU in fp32, not on cpu with bfloat16 autocast"),
    ("cpu-fast", "cuda", None, "runs on CPU in fp32, not on cuda"),
    ("cuda", "cpu", None, "needs a CUDA device"),
    ("tpu-fast", "cpu", None, "unknown backend 'tpu-fast'; choose one of: auto, reference")])
def test_a_backend_that_cannot_run_there_is_a_clear_error(name, device, dtype, message):
    with pytest.raises(TntError, match=re.escape(message)):
        resolve(name, torch.device(device), dtype)


@pytest.mark.parametrize("name", ["tnt-ti", "tnt-s-se", "deit-ti"])
def test_a_backend_keeps_the_parameters_and_state_dict_names(name):
    arch = TINY if name.startswith("tnt") else {"depth": 2, "dim": 48, "heads": 3, "img_size": 32, "num_classes": 10}
    model = create_model(name, **arch)
    params = [id(p) for p in model.parameters()]
    keys = list(model.state_dict())
    assert apply_backend(model, device=CPU, training=True, batch_size=4) == "cpu-fast"
    assert [id(p) for p in model.parameters()] == params and list(model.state_dict()) == keys
    with pytest.raises(TntError, match="already runs on backend cpu-fast"):
        apply_backend(model, device=CPU, training=True)


# ------------------------------------------------------------------------------------------ CPU: parity
@pytest.mark.parametrize("name", ["tnt-ti", "deit-ti"])
def test_cpu_inference_gives_the_plain_models_logits(name, onednn_calls):
    """oneDNN linears with GELU fused, the kernel's inner attention, a last layer computing the class token only."""
    arch = TINY if name == "tnt-ti" else {"depth": 2, "dim": 48, "heads": 3, "img_size": 32, "num_classes": 10}
    torch.manual_seed(0)
    plain = create_model(name, **arch).eval()
    fast = fast_copy(plain, training=False).eval()
    assert isinstance(fast.blocks[-1].outer if name == "tnt-ti" else fast.blocks[-1], common.ClassTokenLayer)
    x = torch.randn(3, 3, arch["img_size"], arch["img_size"])
    with torch.inference_mode():
        want = plain(x)
        assert onednn_calls == []                                          # the plain model takes no fast path
        got = fast(x)
    assert onednn_calls
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("onednn_weight_grad", [False, True], ids=["mkl-wgrad", "onednn-wgrad"])
def test_cpu_training_gives_the_plain_models_gradients(onednn_calls, onednn_weight_grad):
    """oneDNN linears forward and backward (weight gradients on either library), the inner attention on the kernel
    or explicit, the class-token-only last layer. Dropout is off: the last layer draws masks for one row only."""
    plain = create_model("tnt-ti", **{**TINY, "drop_path_rate": 0.2}).train()
    fast = copy.deepcopy(plain)
    cpu.apply(fast, training=True, batch_size=4, options=cpu.CpuOptions(onednn_weight_grad=onednn_weight_grad))
    assert_same_logits_and_grads(fast, plain, torch.randn(4, 3, 16, 16))
    assert onednn_calls


@pytest.mark.parametrize("onednn", [False, True], ids=["mkl", "onednn"])
@pytest.mark.parametrize("out_features, in_features", [(24, 96), (96, 24)])
def test_weight_gradient_is_grad_transposed_times_input(onednn_calls, onednn, out_features, in_features):
    """Both orientations of the oneDNN weight gradient (the wider dimension as the product's columns) and MKL's."""
    grad, x = torch.randn(500, out_features), torch.randn(500, in_features)
    w = cpu.weight_grad(grad, x, onednn)
    assert w.shape == (out_features, in_features) and w.is_contiguous()
    assert len(onednn_calls) == int(onednn)
    torch.testing.assert_close(w.double(), grad.double().t() @ x.double(), rtol=1e-5, atol=1e-4)


def test_class_token_layer_returns_the_full_layers_class_row_and_skips_se_layers():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 32)
    layer = TransformerLayer(32, 2).eval()
    with torch.no_grad():
        full = layer(x)
        common.become(layer, common.ClassTokenLayer)
        first = layer(x)
    assert first.shape == (2, 1, 32)
    torch.testing.assert_close(first[:, 0], full[:, 0], rtol=1e-5, atol=1e-6)
    se_model = create_model("tnt-s-se", **TINY)
    apply_backend(se_model, device=CPU, training=False)
    assert type(se_model.blocks[-1].outer) is TransformerLayer             # SE pools over every row


# ------------------------------------------------------------------------------------------ CPU: the C++ kernel
@pytest.fixture
def kernel():
    """The kernel must build here (`make test` builds it first); CI (TNT_REQUIRE_CPU_KERNELS=1) fails instead of
    skipping when it does not."""
    import os

    if not kernels.available():
        if os.environ.get("TNT_REQUIRE_CPU_KERNELS") == "1":
            pytest.fail("the CPU attention kernel did not build but TNT_REQUIRE_CPU_KERNELS=1", pytrace=False)
        pytest.skip("the CPU attention kernel did not build (no C++ compiler?)")


@pytest.fixture
def kernel_calls(kernel, monkeypatch):
    calls, real = [], kernels.tiny_attention

    def counting(qkv, heads, scale):
        calls.append(tuple(qkv.shape))
        return real(qkv, heads, scale)

    monkeypatch.setattr(kernels, "tiny_attention", counting)
    return calls


def test_inner_attention_runs_on_the_kernel_in_training_and_inference(kernel_calls):
    torch.manual_seed(0)
    plain = create_model("tnt-ti", **{**TINY, "depth": 1}).train()
    fast = fast_copy(plain, training=True)
    assert isinstance(fast.blocks[0].inner.attn, cpu.TinyKernelAttention)
    x = torch.randn(3, 3, 16, 16)
    assert_same_logits_and_grads(fast, plain, x)
    with torch.inference_mode():
        torch.testing.assert_close(fast.eval()(x), plain.eval()(x), rtol=1e-5, atol=1e-5)
    assert kernel_calls == [(12, 4, 24), (12, 4, 24)]                      # 3 images x 4 patches, 4 words


def test_attention_dropout_or_no_kernel_keeps_aten_attention(kernel_calls):
    dropout = create_model("tnt-ti", **{**TINY, "attn_drop_rate": 0.1})
    apply_backend(dropout, device=CPU, training=True, batch_size=2)
    no_kernel = create_model("tnt-ti", **TINY)
    cpu.apply(no_kernel, training=True, batch_size=2, options=cpu.CpuOptions(tiny_kernel=False))
    for model in (dropout, no_kernel):                                     # training, head dim 4: explicit
        assert type(model.blocks[0].inner.attn) is common.ExplicitAttention
        model(torch.randn(2, 3, 16, 16)).sum().backward()
    assert kernel_calls == []


def test_a_failing_kernel_build_keeps_atens_attention_with_one_warning(monkeypatch, caplog):
    attempts = []

    def broken():
        attempts.append(1)
        raise RuntimeError("Error building extension 'tnt_tiny_attention'\nlong compiler output")

    monkeypatch.setattr(kernels, "_state", None)
    monkeypatch.setattr(kernels, "_build", broken)
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        models = [create_model("tnt-ti", **TINY) for _ in range(2)]
        for model in models:
            apply_backend(model, device=CPU, training=False)
    assert attempts == [1]
    assert all(type(m.blocks[0].inner.attn).__name__ == "Attention" for m in models)
    assert [r.getMessage() for r in caplog.records] == [
        "building the CPU attention kernel failed, using aten's: Error building extension 'tnt_tiny_attention'"]


def test_kernel_gives_the_attention_and_its_gradients_for_the_shapes_it_is_built_for(kernel):
    """TNT-S and TNT-B inner shapes (16 words, head dim 6 and 10), the tests' tiny models, another head count;
    peaked softmaxes (scores of +-10). Against float64 aten attention, which fp32 aten misses by ~3x as much."""
    for words, heads, head_dim in [(16, 4, 6), (16, 4, 10), (4, 2, 4), (16, 2, 12)]:
        torch.manual_seed(0)
        qkv = (3 * torch.randn(37, words, 3 * heads * head_dim)).requires_grad_()
        qkv64 = qkv.detach().double().requires_grad_()
        q, k, v = qkv64.view(37, words, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        want = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(37, words, heads * head_dim)
        out = kernels.tiny_attention(qkv, heads, head_dim ** -0.5)
        grad = torch.randn_like(out)
        got_grad, = torch.autograd.grad(out, qkv, grad)
        want_grad, = torch.autograd.grad(want, qkv64, grad.double())
        for got, expected in ((out, want), (got_grad, want_grad)):
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    with pytest.raises(ValueError, match="no kernel for 5 words of head dim 2"):
        kernels.tiny_attention(torch.randn(2, 5, 12), 2, 0.5)


def test_kernel_op_registration_passes_torch_opcheck(kernel):
    """Schema, fake tensor (what torch.compile traces) and autograd registration, as torch checks custom ops."""
    qkv = torch.randn(5, 16, 72, requires_grad=True)
    torch.library.opcheck(torch.ops.tnt.tiny_attention.default, (qkv, 4, 6 ** -0.5))


# ------------------------------------------------------------------------------------------ CPU: compiled inner layers
@pytest.fixture
def compile_any_size(monkeypatch):
    """Compile the inner transformer whatever its size (tests use tiny models)."""
    monkeypatch.setattr(cpu, "COMPILE_MIN_ROWS", 1)
    monkeypatch.setattr(common.CompiledLayer, "failed", False)
    return cpu.CpuOptions(compile_min_rows=1)


@pytest.fixture
def graphs(monkeypatch):
    """Compile through a backend that records each graph dynamo makes and runs it as it is (no inductor)."""
    made = []

    def recording(gm, example_inputs):
        made.append(gm)
        return gm.forward

    monkeypatch.setattr(common, "_compiled_forward", lambda: compiled)
    compiled = torch.compile(lambda layer, x: TransformerLayer.forward(layer, x), backend=recording, dynamic=False)
    torch._dynamo.reset()
    yield made
    torch._dynamo.reset()


def test_one_graph_serves_every_inner_layer_under_a_drop_path_schedule(compile_any_size, graphs):
    """The paper recipe's drop path rises from 0 to 0.1 over the blocks. With the rate a Python float, dynamo
    specialised on it and recompiled every inner layer until its recompile limit; as a tensor it does not."""
    model = create_model("tnt-ti", **{**TINY, "depth": 6, "drop_path_rate": 0.1}).train()
    cpu.apply(model, training=True, batch_size=4, options=compile_any_size)
    assert all(isinstance(b.inner, common.CompiledLayer) for b in model.blocks)
    for _ in range(2):
        model(torch.randn(4, 3, 16, 16)).sum().backward()
    assert len(graphs) == 2                                # drop path off (block 0) and on (blocks 1-5)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_inner_transformer_gives_the_plain_gradients(compile_any_size, checkpointing, monkeypatch):
    """Inductor fuses the inner transformer's memory-bound passes; its skinny linears run on oneDNN as one opaque
    op (or as row blocks). Logits and every gradient stay the plain model's, with activation checkpointing too.
    No drop path: inductor draws its random numbers its own way."""
    skinny, real = [], cpu.onednn_linear_op if cpu.ONEDNN_LINEAR else cpu.row_blocked_linear
    monkeypatch.setattr(cpu, "onednn_linear_op" if cpu.ONEDNN_LINEAR else "row_blocked_linear",
                        lambda x, w, b: skinny.append(tuple(w.shape)) or real(x, w, b))
    torch._dynamo.reset()
    plain = create_model("tnt-ti", **TINY).train()                       # 4 images x 4 patches x 4 words = 64 rows
    plain.set_grad_checkpointing(checkpointing)
    fast = copy.deepcopy(plain)
    cpu.apply(fast, training=True, batch_size=4, options=compile_any_size)
    assert_same_logits_and_grads(fast, plain, torch.randn(4, 3, 16, 16))
    assert skinny, "the skinny linears did not take the custom op"


@pytest.mark.parametrize("kind", ["row_blocks", "onednn_op", "onednn_op_compiled"])
def test_compiled_skinny_linear_gives_the_linears_output_and_gradients(kind):
    if kind != "row_blocks" and not cpu.ONEDNN_LINEAR:
        pytest.skip("this torch has no oneDNN linear")
    torch.manual_seed(0)
    x, weight, bias = (torch.randn(*shape, requires_grad=True) for shape in ((8, 16, 24), (96, 24), (96,)))
    skinny = {"row_blocks": cpu.row_blocked_linear, "onednn_op": cpu.onednn_linear_op,
              "onednn_op_compiled": torch.compile(cpu.onednn_linear_op, fullgraph=True)}[kind]
    y = skinny(x, weight, bias)
    grads = torch.autograd.grad(y.square().sum(), (x, weight, bias))
    plain = F.linear(x, weight, bias)
    for got, want in zip(grads, torch.autograd.grad(plain.square().sum(), (x, weight, bias))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y, plain)


@pytest.mark.skipif(not cpu.ONEDNN_LINEAR, reason="this torch has no oneDNN linear")
def test_onednn_custom_op_passes_torchs_operator_checks():
    x, weight, bias = torch.randn(128, 24), torch.randn(96, 24, requires_grad=True), torch.randn(96)
    for args in ((x, weight, bias), (x.requires_grad_(), weight, None)):
        torch.library.opcheck(cpu.onednn_linear_op, args)


def test_inner_transformer_compiles_only_for_large_cpu_training():
    def compiled(backend="cpu-fast", training=True, batch_size=10**4):
        model = create_model("tnt-ti", **TINY)
        apply_backend(model, backend, device=CPU, training=training, batch_size=batch_size)
        return [isinstance(b.inner, common.CompiledLayer) for b in model.blocks]

    assert compiled() == [True, True]                    # 10k images x 16 words >= 32768 rows
    assert compiled(batch_size=4) == [False, False]      # below the size threshold
    assert compiled(training=False) == [False, False]
    assert compiled(backend="cpu-eager") == [False, False]


def test_a_failing_compiler_falls_back_to_eager_with_one_warning(compile_any_size, monkeypatch, caplog):
    attempts = []

    def broken(layer, x):
        attempts.append(1)
        raise RuntimeError("no C++ compiler found\nlong details")

    monkeypatch.setattr(common, "_compiled_forward", lambda: broken)
    layer = TransformerLayer(8, 2).train()
    x = torch.randn(3, 5, 8, requires_grad=True)
    first = layer(x)
    common.compile_layer(layer)
    with caplog.at_level("WARNING", logger=common.__name__):
        outputs = [layer(x) for _ in range(3)]
    for out in outputs:
        torch.testing.assert_close(out, first)
    assert attempts == [1]                                 # tried once, then eager for good
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile of the inner transformer failed, running it eagerly: no C++ compiler found"]


# ------------------------------------------------------------------------------------------ CUDA paths, checked on CPU
@pytest.mark.parametrize("candidate", list(cuda.INNER_CANDIDATES))
def test_each_cuda_inner_attention_candidate_gives_the_plain_gradients(candidate, compile_any_size, graphs):
    plain = create_model("tnt-ti", **TINY).train()
    fast = copy.deepcopy(plain)
    for b in fast.blocks:
        cuda.INNER_CANDIDATES[candidate](b.inner)
    assert_same_logits_and_grads(fast, plain, torch.randn(4, 3, 16, 16))


def test_chunked_attention_splits_a_batch_over_the_grid_limit(monkeypatch):
    """With the limit lowered to 5 sequences, 12 sequences run as chunks of 5, 5 and 2, equal to one SDPA call."""
    calls, real = [], F.scaled_dot_product_attention
    monkeypatch.setattr(cuda.F, "scaled_dot_product_attention", lambda q, *a, **k: calls.append(q.shape[0]) or
                        real(q, *a, **k))
    layer = TransformerLayer(8, 2).eval()
    x = torch.randn(12, 4, 8)
    with torch.no_grad():
        want = layer(x)
        calls.clear()
        common.become(layer.attn, cuda.ChunkedAttention).max_batch = 5
        got = layer(x)
    assert calls == [5, 5, 2]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_the_fastest_cuda_candidate_is_chosen_and_a_failing_one_is_skipped(monkeypatch):
    seconds = {"sdpa": 3.0, "explicit": 1.0, "compiled": 0.5}

    def fake_time(fn, device, reps):
        name = next(n for n in seconds if n not in timed)
        timed.append(name)
        if name == "compiled":
            raise RuntimeError("CUDA error: invalid configuration argument")
        return seconds[name]

    timed = []
    monkeypatch.setattr(cuda, "seconds_per_call", fake_time)
    layer = TransformerLayer(8, 2)
    assert cuda.choose_inner_attention(layer, (6, 4, 8), None, training=True) == "explicit"
    assert timed == ["sdpa", "explicit", "compiled"]


def test_a_stale_kernel_build_lock_is_cleared_but_a_live_one_is_respected(tmp_path):
    """A build killed midway leaves cpp_extension's lock behind; it must not send every later process through a
    rebuild check (slow, and a CUDA_HOME warning on CPU machines). A live build's library may be half-written."""
    import os
    import time

    lock, library = tmp_path / "lock", tmp_path / "kernel.so"
    lock.touch()
    assert kernels._build_in_progress(lock, library) and lock.exists()          # building, nothing linked yet
    library.touch()
    assert kernels._build_in_progress(lock, library) and lock.exists()          # just linked: wait for the builder
    old = time.time() - 2 * kernels._LINK_SETTLE_SECONDS
    os.utime(library, (old, old))
    assert not kernels._build_in_progress(lock, library) and not lock.exists()  # linked long ago: stale
    lock.touch()
    library.unlink()
    old = time.time() - 2 * kernels._STALE_LOCK_SECONDS
    os.utime(lock, (old, old))
    assert not kernels._build_in_progress(lock, library) and not lock.exists()  # older than any build
