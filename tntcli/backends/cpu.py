"""CPU fp32 speed paths, applied to a built model by `apply` (each measured on CPU, see benchmarks/README.md).

- Every linear runs on oneDNN (the kernels `torch.compile`'s CPU backend picks) and, at inference, the MLP's GELU
  is fused into its first linear. On AVX-512 CPUs the weight gradients run on oneDNN too (MKL's mm elsewhere).
- Attention over TNT's tiny inner sequences (16 words, head dim 6 or 10) runs on our C++ kernel (`kernels.py`,
  built on first use), forward and backward straight from the fused qkv rows. Without it (no compiler, other
  shapes, attention dropout), training runs tiny heads as explicit matmul-softmax-matmul, whose backward is faster
  here than SDPA's flash kernel.
- In training, narrow layers over many rows (TNT's inner transformer: d=24 over B*196*16 words) run through
  `torch.compile`, which fuses their memory-bound passes (norms, softmax, GELU, residuals, head layout copies);
  wide layers stay eager on oneDNN, which beats inductor's GEMMs there. In a compiled graph the skinny linears run
  forward and input gradient on oneDNN as one opaque custom op (`tnt::onednn_linear`), their weight gradients as
  64 row blocks. One graph serves every inner layer: drop-path rates become tensors (graph inputs), not constants.

Each module is given its path once, when the backend is applied, by changing its class to a subclass here that
overrides `forward` only: parameters, buffers and state-dict names stay those of the plain model.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from tntcli.backends import kernels
from tntcli.backends.common import ExplicitAttention, become, compile_layer, inner_layers, use_class_token_last_layer
from tntcli.models.layers import Attention, Mlp, TransformerLayer

ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_TINY_HEAD_DIM = 16            # heads narrower than this skip SDPA when training
# Compile a narrow layer for training only from this many rows (tokens) a batch on: TNT-S at 224px has 3136 words
# an image (100352 at batch 32); small models, the quickstart (16384 words a batch) and tests stay eager and skip
# the ~15 s of compilation.
COMPILE_MAX_DIM, COMPILE_MIN_ROWS = 64, 32768
_ROW_BLOCKS = 64               # row blocks of a skinny linear in a compiled graph


@dataclass(frozen=True)
class CpuOptions:
    """What the CPU backend may use. `onednn_weight_grad` None: where the CPU has AVX-512 (on an AMD AVX-512 EPYC
    MKL's mm ran the weight gradients at ~100 GMAC/s and oneDNN at 140-190; on an AVX2 EPYC oneDNN was 11-28% slower
    for three of four shapes)."""
    tiny_kernel: bool = True
    compile_inner: bool = True
    onednn_weight_grad: bool | None = None
    compile_min_rows: int = COMPILE_MIN_ROWS


def apply(model: nn.Module, *, training: bool, batch_size: int | None, options: CpuOptions = CpuOptions()) -> None:
    """Give every module of `model` its CPU fp32 path (in place). `training`: the model will be trained (the
    inner layers compile and tiny heads take the explicit path); `batch_size` sizes the compile decision."""
    weight_grad = options.onednn_weight_grad
    if weight_grad is None:
        weight_grad = torch.backends.cpu.get_cpu_capability() == "AVX512"
    use_class_token_last_layer(model, linear=functools.partial(linear, onednn_weight_grad=weight_grad)
                               if ONEDNN_LINEAR else F.linear)
    words = getattr(getattr(model, "cfg", None), "num_words", None)
    inner = set(map(id, inner_layers(model)))
    rows = batch_size * model.cfg.grid ** 2 * words if words and batch_size else 0
    for module in list(model.modules()):
        if type(module) is nn.Linear and ONEDNN_LINEAR:
            become(module, OneDNNLinear).onednn_weight_grad = weight_grad
        elif type(module) is Mlp and ONEDNN_LINEAR:
            become(module, GeluFusedMlp)
        elif isinstance(module, TransformerLayer) and id(module) in inner:
            _inner_attention(module.attn, words, options.tiny_kernel, training)
            if (training and options.compile_inner and module.norm1.normalized_shape[0] <= COMPILE_MAX_DIM
                    and rows >= options.compile_min_rows):
                compile_layer(module)


def _inner_attention(attn: Attention, words: int, kernel: bool, training: bool) -> None:
    # `available()` last: it builds or loads the library, which only a layer that can use it should pay for
    if kernel and not attn.attn_drop and kernels.supports(words, attn.head_dim) and kernels.available():
        become(attn, TinyKernelAttention)
    elif training and attn.head_dim < _TINY_HEAD_DIM:
        become(attn, ExplicitAttention)


# ------------------------------------------------------------------------------------------- linears
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  post_op: str = "none") -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post_op, [], "none" if post_op == "gelu" else "")


class _OneDNNLinearFn(torch.autograd.Function):
    """A linear layer whose products run on oneDNN. aten's addmm first copies the broadcast bias into the output
    and then accumulates on it; oneDNN adds the bias inside the kernel."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                onednn_weight_grad: bool) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.onednn_weight_grad = bias is not None, onednn_weight_grad
        return onednn_linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_2d = grad.view(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_linear(grad, weight.t().contiguous(), None)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(grad_2d, x.reshape(-1, x.shape[-1]), ctx.onednn_weight_grad)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b, None


def weight_grad(grad_2d: torch.Tensor, x_2d: torch.Tensor, onednn: bool) -> torch.Tensor:
    """grad^T @ x, the weight gradient of a linear layer, with both operands as strided views (no transpose copies).
    oneDNN ran it faster with the wider of the two dimensions as the product's columns."""
    if not onednn:
        return grad_2d.t() @ x_2d
    if grad_2d.shape[1] <= x_2d.shape[1]:
        return onednn_linear(grad_2d.t(), x_2d.t(), None)
    return onednn_linear(x_2d.t(), grad_2d.t(), None).t().contiguous()


def row_blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` as `_ROW_BLOCKS` independent products of row blocks. With K or N of 24-96 over ~100k rows (TNT's
    inner transformer) MKL runs one GEMM, and above all its 100k-long weight-gradient reduction, at 25-45 GMAC/s;
    aten's bmm spreads the blocks over the threads, 1.3-1.8x faster. Autograd of the expanded weight sums the
    blocks' weight gradients; the bias is a separate add that inductor fuses into the next elementwise kernel."""
    k, n = weight.shape[1], weight.shape[0]
    y = torch.bmm(x.reshape(_ROW_BLOCKS, -1, k), weight.t().expand(_ROW_BLOCKS, k, n)).view(*x.shape[:-1], n)
    return y if bias is None else y + bias


def _row_blocked_weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # grad^T @ x over ~100k rows as `_ROW_BLOCKS` block products summed: the reduction `row_blocked_linear`'s
    # autograd runs, which beat both MKL's and oneDNN's single long-K product for these skinny shapes.
    n, k = grad.shape[-1], x.shape[-1]
    return torch.bmm(grad.reshape(_ROW_BLOCKS, -1, n).transpose(1, 2), x.reshape(_ROW_BLOCKS, -1, k)).sum(0)


@torch.library.custom_op("tnt::onednn_linear", mutates_args=())
def onednn_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's linear as one op inductor does not look into: in a compiled graph the skinny linears' forward and
    input gradient ran on it ~1.9x faster than as row blocks (the weight gradient stays row-blocked)."""
    return onednn_linear(x.contiguous(), weight.contiguous(), bias)


@onednn_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _onednn_linear_op_setup(ctx, inputs, output) -> None:
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _onednn_linear_op_backward(ctx, grad: torch.Tensor):
    x, weight = ctx.saved_tensors
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = onednn_linear_op(grad, weight.t().contiguous(), None)
    if ctx.needs_input_grad[1]:
        grad_w = _row_blocked_weight_grad(grad, x)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, grad_w, grad_b


onednn_linear_op.register_autograd(_onednn_linear_op_backward, setup_context=_onednn_linear_op_setup)


def _compiled_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A linear inside a compiled graph: skinny ones over many rows as the opaque oneDNN op, others as inductor
    makes them. (Rows are static shapes there, so these checks run once, at tracing.)"""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if min(weight.shape) <= COMPILE_MAX_DIM and rows >= COMPILE_MIN_ROWS and rows % _ROW_BLOCKS == 0:
        return onednn_linear_op(x, weight, bias) if ONEDNN_LINEAR else row_blocked_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           onednn_weight_grad: bool = False) -> torch.Tensor:
    """`F.linear` on oneDNN, or inside a compiled graph (the inner transformer's, or the whole model's with
    `--compile`) as `_compiled_linear` picks."""
    if torch.compiler.is_compiling():
        return _compiled_linear(x, weight, bias)
    return _OneDNNLinearFn.apply(x, weight, bias, onednn_weight_grad)


class OneDNNLinear(nn.Linear):
    onednn_weight_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.onednn_weight_grad)


class GeluFusedMlp(Mlp):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return super().forward(x)
        # GELU as a oneDNN post-op of fc1: only without gradients, since backward would need GELU's input
        return self.drop(self.fc2(self.drop(onednn_linear(x, self.fc1.weight, self.fc1.bias, "gelu"))))


# ------------------------------------------------------------------------------------------- attention
class TinyKernelAttention(Attention):
    """The inner transformer's attention on the C++ kernel, which reads q, k, v straight from the fused rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(kernels.tiny_attention(self.qkv(x), self.num_heads, self.scale)))
