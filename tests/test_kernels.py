"""The C++ CPU kernel for tiny attention (models/kernels.py): same outputs and gradients as aten's attention, used
where it applies, and a clean fallback where it cannot be built."""
from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F

from tntcli.models import kernels, layers


@pytest.fixture
def kernel():
    """The kernel must build here; CI (TNT_REQUIRE_CPU_KERNELS=1) fails instead of skipping when it does not."""
    if not kernels.available():
        if os.environ.get("TNT_REQUIRE_CPU_KERNELS") == "1":
            pytest.fail("the CPU attention kernel did not build but TNT_REQUIRE_CPU_KERNELS=1", pytrace=False)
        pytest.skip("the CPU attention kernel did not build (no C++ compiler?)")


def aten_attention(qkv: torch.Tensor, heads: int, scale: float) -> torch.Tensor:
    n, words, dim3 = qkv.shape
    q, k, v = qkv.view(n, words, 3, heads, dim3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2).reshape(n, words, dim3 // 3)


@pytest.mark.parametrize("words, heads, head_dim", [(16, 4, 6), (16, 4, 10), (4, 2, 4), (16, 2, 12)])
def test_kernel_gives_the_attention_and_its_gradients(kernel, words, heads, head_dim):
    """TNT-S and TNT-B inner shapes (16 words, head dim 6 and 10), the tests' tiny models, another head count;
    peaked softmaxes (scores of +-10). Checked against float64 aten attention, which fp32 aten misses by about
    3x as much as the kernel does."""
    torch.manual_seed(0)
    qkv = (3 * torch.randn(37, words, 3 * heads * head_dim)).requires_grad_()
    qkv64 = qkv.detach().double().requires_grad_()
    scale = head_dim ** -0.5
    out, want = kernels.tiny_attention(qkv, heads, scale), aten_attention(qkv64, heads, scale)
    grad = torch.randn_like(out)
    got_grad, = torch.autograd.grad(out, qkv, grad)
    want_grad, = torch.autograd.grad(want, qkv64, grad.double())
    for got, expected in ((out, want), (got_grad, want_grad)):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_kernel_op_registration_passes_torch_opcheck(kernel):
    """Schema, fake tensor (what torch.compile traces) and autograd registration, as torch checks custom ops."""
    qkv = torch.randn(5, 16, 72, requires_grad=True)
    torch.library.opcheck(torch.ops.tnt.tiny_attention.default, (qkv, 4, 6 ** -0.5))


def test_kernel_rejects_shapes_it_was_not_built_for(kernel):
    with pytest.raises(ValueError, match="no kernel for 5 words of head dim 2"):
        kernels.tiny_attention(torch.randn(2, 5, 12), 2, 0.5)


@pytest.fixture
def kernel_calls(kernel, monkeypatch):
    calls, real = [], kernels.tiny_attention

    def counting(qkv, heads, scale):
        calls.append(tuple(qkv.shape))
        return real(qkv, heads, scale)

    monkeypatch.setattr(kernels, "tiny_attention", counting)
    return calls


def test_attention_runs_tiny_heads_on_the_kernel_in_training_and_inference(kernel_calls):
    torch.manual_seed(0)
    layer = layers.TransformerLayer(8, 2).train()                       # head dim 4
    x = torch.randn(6, 4, 8, requires_grad=True)
    fast = layer(x)
    fast_grad, = torch.autograd.grad(fast.sum(), x)
    with torch.inference_mode():
        fast_infer = layer(x.detach())
    assert kernel_calls == [(6, 4, 24), (6, 4, 24)]
    with layers.reference_mode():
        reference = layer(x)
        reference_grad, = torch.autograd.grad(reference.sum(), x)
    assert len(kernel_calls) == 2                                        # the reference path does not use it
    for got in (fast, fast_infer):
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_grad, reference_grad, rtol=1e-4, atol=1e-5)


def test_other_shapes_dropout_and_bf16_keep_atens_attention(kernel_calls):
    x = torch.randn(3, 5, 8)
    layers.TransformerLayer(8, 2)(x)                                    # 5 words: not built for it
    layers.TransformerLayer(8, 2, attn_drop=0.1).train()(x[:, :4])        # attention dropout
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layers.TransformerLayer(8, 2)(x[:, :4])
    layers.TransformerLayer(64, 2)(torch.randn(2, 4, 64))                # head dim 32: SDPA's size
    assert kernel_calls == []


def test_a_failing_build_keeps_atens_attention_with_one_warning(monkeypatch, caplog):
    attempts = []

    def broken():
        attempts.append(1)
        raise RuntimeError("Error building extension 'tnt_tiny_attention'\nlong compiler output")

    monkeypatch.setattr(kernels, "_state", None)
    monkeypatch.setattr(kernels, "_build", broken)
    monkeypatch.delenv("TNT_CPU_KERNELS", raising=False)
    layer = layers.TransformerLayer(8, 2).train()
    x = torch.randn(3, 4, 8)
    with caplog.at_level(logging.WARNING, logger=kernels.__name__):
        first, second = layer(x), layer(x)
    torch.testing.assert_close(first, second)
    assert attempts == [1]
    assert [r.getMessage() for r in caplog.records] == [
        "building the CPU attention kernel failed, using aten's: Error building extension 'tnt_tiny_attention'"]


def test_switched_off_by_environment_without_building(monkeypatch):
    monkeypatch.setattr(kernels, "_state", None)
    monkeypatch.setattr(kernels, "_build", lambda: pytest.fail("built although TNT_CPU_KERNELS=0"))
    monkeypatch.setenv("TNT_CPU_KERNELS", "0")
    assert not kernels.available()
