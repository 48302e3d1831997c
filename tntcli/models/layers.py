"""Layers shared by TNT and DeiT: attention, MLP, drop-path, squeeze-excite, a pre-norm transformer layer.

Every transformer in the toolkit (DeiT blocks, TNT's inner and outer transformers) is a `TransformerLayer`,
so an optimisation made here reaches all of them.

Fast paths (each measured on CPU, see benchmarks/README.md); inside `reference_mode()` none of them is taken:
- On CPU in fp32 every linear runs on oneDNN (the kernels `torch.compile`'s CPU backend picks), with the MLP's GELU
  fused in at inference. On AVX-512 CPUs its weight gradients run on oneDNN too (`TNT_ONEDNN_WGRAD=0`: MKL's mm).
- On CPU in fp32, attention over tiny sequences (TNT's inner transformer: 16 words, head dim 6 or 10) runs on our C++
  kernel (`models/kernels.py`, built on first use), forward and backward straight from the fused qkv rows. Without
  it (no compiler, `TNT_CPU_KERNELS=0`, other shapes), CPU training runs tiny heads as explicit
  matmul-softmax-matmul, whose backward is faster there than SDPA's flash kernel.
- `cls_only`: the last layer of a class-token model computes only the row its classifier reads.
- CPU fp32 training compiles narrow, long layers (TNT's inner transformer: d=24 over B*196*16 words) with
  `torch.compile`, which fuses their memory-bound passes (norms, softmax, GELU, residuals, head layout copies);
  wide layers stay eager on oneDNN, which beats inductor's GEMMs there. `TNT_CPU_COMPILE=0` switches it off.
  In a compiled CPU graph the skinny linears run forward and input gradient on oneDNN as one opaque custom op
  (`tnt::onednn_linear`), their weight gradients as 64 row blocks (`_row_blocked_linear` without oneDNN).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from tntcli.models import kernels

ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# Weight gradients on oneDNN too where the CPU has AVX-512: on an AMD AVX-512 EPYC, MKL's mm (its AVX2 code on AMD)
# ran them at ~100 GMAC/s and oneDNN at 140-190; on an AVX2 EPYC oneDNN was 11-28% slower for three of four shapes.
_ONEDNN_WEIGHT_GRAD = (ONEDNN_LINEAR and os.environ.get("TNT_ONEDNN_WGRAD", "1") != "0"
                       and torch.backends.cpu.get_cpu_capability() == "AVX512")
_TINY_HEAD_DIM = 16            # heads narrower than this skip SDPA when training on CPU
_fast_paths = True
# Compile a narrow layer for CPU training only from this many rows (tokens) on: TNT-S at 224px has 3136 words an
# image (100352 at batch 32); small models, the quickstart (16384 words a batch) and tests stay eager and skip the
# ~15 s of compilation.
_COMPILE_MAX_DIM, _COMPILE_MIN_ROWS = 64, 32768
_ROW_BLOCKS = 64               # row blocks of a skinny linear in a compiled CPU graph
_compile_failed = False
log = logging.getLogger(__name__)


@contextlib.contextmanager
def reference_mode() -> Iterator[None]:
    """Run the models as plain aten ops over every token: the reference the fast paths are tested and timed
    against, and what FLOP counting sees (the architecture's nominal cost)."""
    global _fast_paths
    saved, _fast_paths = _fast_paths, False
    try:
        yield
    finally:
        _fast_paths = saved


def _cpu_fp32(x: torch.Tensor) -> bool:
    # fp32 CPU only: autocast would not see our choices (and would promote a bf16 product to fp32 in a bias add).
    return _fast_paths and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def _cpu_fp32_fast_path(x: torch.Tensor) -> bool:
    # Eager only: while tracing or compiling, fvcore must count aten ops and inductor makes its own choice.
    return _cpu_fp32(x) and not torch.jit.is_tracing() and not torch.compiler.is_compiling()


def _many_rows(x: torch.Tensor) -> bool:
    return x.shape[-1] > 0 and x.numel() // x.shape[-1] >= _COMPILE_MIN_ROWS


def _use_tiny_kernel(x: torch.Tensor, words: int, head_dim: int) -> bool:
    # Eager or inside a compiled graph (one opaque op there), training and inference; not when traced (fvcore).
    return (_cpu_fp32(x) and not torch.jit.is_tracing() and kernels.supports(words, head_dim)
            and kernels.available())


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return ONEDNN_LINEAR and weight.dtype == torch.float32 and _cpu_fp32_fast_path(x)


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   post_op: str = "none") -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post_op, [], "none" if post_op == "gelu" else "")


class _OneDNNLinear(torch.autograd.Function):
    """A linear layer whose products run on oneDNN. aten's addmm first copies the broadcast bias into the output
    and then accumulates on it; oneDNN adds the bias inside the kernel. The weight gradient stays on aten's mm."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
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
            grad_w = _weight_grad(grad_2d, x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_2d.sum(0)
        return grad_x, grad_w, grad_b


def _weight_grad(grad_2d: torch.Tensor, x_2d: torch.Tensor) -> torch.Tensor:
    """grad^T @ x, the weight gradient of a linear layer, with both operands as strided views (no transpose copies).
    oneDNN ran it faster with the wider of the two dimensions as the product's columns."""
    if not _ONEDNN_WEIGHT_GRAD:
        return grad_2d.t() @ x_2d
    if grad_2d.shape[1] <= x_2d.shape[1]:
        return onednn_linear(grad_2d.t(), x_2d.t(), None)
    return onednn_linear(x_2d.t(), grad_2d.t(), None).t().contiguous()


def _row_blocked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` as `_ROW_BLOCKS` independent products of row blocks. With K or N of 24-96 over ~100k rows (TNT's
    inner transformer) MKL runs one GEMM, and above all its 100k-long weight-gradient reduction, at 25-45 GMAC/s;
    aten's bmm spreads the blocks over the threads, 1.3-1.8x faster. Autograd of the expanded weight sums the
    blocks' weight gradients; the bias is a separate add that inductor fuses into the next elementwise kernel."""
    k, n = weight.shape[1], weight.shape[0]
    y = torch.bmm(x.reshape(_ROW_BLOCKS, -1, k), weight.t().expand(_ROW_BLOCKS, k, n)).view(*x.shape[:-1], n)
    return y if bias is None else y + bias


def _row_blocked_weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # grad^T @ x over ~100k rows as `_ROW_BLOCKS` block products summed: the reduction `_row_blocked_linear`'s
    # autograd runs, which beat both MKL's and oneDNN's single long-K product for these skinny shapes.
    n, k = grad.shape[-1], x.shape[-1]
    return torch.bmm(grad.reshape(_ROW_BLOCKS, -1, n).transpose(1, 2), x.reshape(_ROW_BLOCKS, -1, k)).sum(0)


@torch.library.custom_op("tnt::onednn_linear", mutates_args=())
def _onednn_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's linear as one op inductor does not look into: in a compiled graph the skinny linears' forward and
    input gradient ran on it ~1.9x faster than as row blocks (the weight gradient stays row-blocked)."""
    return onednn_linear(x.contiguous(), weight.contiguous(), bias)


@_onednn_linear_op.register_fake
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
        grad_x = _onednn_linear_op(grad, weight.t().contiguous(), None)
    if ctx.needs_input_grad[1]:
        grad_w = _row_blocked_weight_grad(grad, x)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, grad_w, grad_b


_onednn_linear_op.register_autograd(_onednn_linear_op_backward, setup_context=_onednn_linear_op_setup)


def _compiled_skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A skinny linear over many rows inside a compiled CPU fp32 graph (see `_use_row_blocks`)."""
    if ONEDNN_LINEAR:
        return _onednn_linear_op(x, weight, bias)
    return _row_blocked_linear(x, weight, bias)


def _use_row_blocks(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # Only in a compiled CPU fp32 graph: the inner transformer's, or the whole model's with --compile.
    return (torch.compiler.is_compiling() and _cpu_fp32(x) and min(weight.shape) <= _COMPILE_MAX_DIM
            and _many_rows(x) and (x.numel() // x.shape[-1]) % _ROW_BLOCKS == 0)


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gelu: bool = False) -> torch.Tensor:
    """`F.linear`, optionally followed by exact GELU, on the fastest kernel for where and how it runs."""
    if _use_onednn(x, weight):
        if gelu and not torch.is_grad_enabled():      # GELU fused as a post-op: backward would need its input
            return onednn_linear(x, weight, bias, "gelu")
        y = _OneDNNLinear.apply(x, weight, bias)
    elif _use_row_blocks(x, weight):
        y = _compiled_skinny_linear(x, weight, bias)
    else:
        y = F.linear(x, weight, bias)
    return F.gelu(y) if gelu else y


def linear(x: torch.Tensor, layer: nn.Linear, gelu: bool = False) -> torch.Tensor:
    return dense(x, layer.weight, layer.bias, gelu)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability `rate` (training only)."""

    def __init__(self, rate: float = 0.0):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate:.3f}"


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and `scaled_dot_product_attention`.

    The official TNT code keeps separate `qk` and `v` projections; their weights concatenate into `qkv`
    exactly (rows q, k, v), so checkpoints convert without changing a number (see models/checkpoints.py).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, queries: int | None = None) -> torch.Tensor:
        """Attend from every token, or from the first `queries` tokens only (keys and values still cover all)."""
        B, N, C = x.shape
        H, D = self.num_heads, self.head_dim
        attn_drop = self.attn_drop if self.training else 0.0
        if queries is None and not attn_drop and _use_tiny_kernel(x, N, D):
            return self.proj_drop(linear(kernels.tiny_attention(linear(x, self.qkv), H, self.scale), self.proj))
        if queries is None:
            q, k, v = linear(x, self.qkv).view(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            w, b = self.qkv.weight, self.qkv.bias
            q = dense(x[:, :queries], w[:C], None if b is None else b[:C]).view(B, queries, H, D).transpose(1, 2)
            k, v = dense(x, w[C:], None if b is None else b[C:]).view(B, N, 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        if _fast_paths and D < _TINY_HEAD_DIM and x.device.type == "cpu" and torch.is_grad_enabled():
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            x = (F.dropout(attn, attn_drop) if attn_drop else attn) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=attn_drop)
        return self.proj_drop(linear(x.transpose(1, 2).reshape(B, q.shape[2], C), self.proj))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear, as in ViT."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(linear(self.drop(linear(x, self.fc1, gelu=True)), self.fc2))


class SqueezeExcite(nn.Module):
    """TNT's token SE (paper appendix): gate the MLP output by a tanh of the token-mean's bottleneck."""

    def __init__(self, dim: int, hidden_ratio: float = 0.25):
        super().__init__()
        hidden = int(dim * hidden_ratio)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(F.relu(self.fc1(self.norm(x.mean(dim=1, keepdim=True)))))
        return x * torch.tanh(gate)


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: x += drop_path(attn(norm(x))); x += drop_path(mlp(norm(x))).

    With `se=True` the MLP branch becomes `mlp + se(mlp)`, the official TNT-S-SE block.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-5,
                 se: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.se = SqueezeExcite(dim) if se else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, cls_only: bool = False) -> torch.Tensor:
        """`cls_only`: return row 0 only (B, 1, dim), for a last layer whose successor reads just the class token.
        Not with SE, whose gate pools over all rows."""
        if cls_only and _fast_paths and self.se is None:
            x = x[:, :1] + self.drop_path(self.attn(self.norm1(x), queries=1))
        else:
            x = x + self.drop_path(self.attn(self.norm1(x)))
        y = self.mlp(self.norm2(x))
        if self.se is not None:
            y = y + self.se(y)
        return x + self.drop_path(y)


@functools.cache
def _compiled_apply():
    # One compiled function for every layer it is given: parameters are graph inputs, so the twelve inner layers
    # of a TNT share one graph (per input shape and module configuration).
    return torch.compile(lambda layer, x: layer(x), dynamic=False)


def _compile_for_cpu_training(x: torch.Tensor) -> bool:
    return (x.shape[-1] <= _COMPILE_MAX_DIM and _many_rows(x) and not _compile_failed and torch.is_grad_enabled()
            and _cpu_fp32_fast_path(x) and os.environ.get("TNT_CPU_COMPILE", "1") != "0")


def apply_layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`layer(x)`, compiled when training a narrow layer on many rows on CPU (see the module docstring). Falls
    back to eager for good, with one warning, if compilation fails (for instance no C++ compiler)."""
    global _compile_failed
    if _compile_for_cpu_training(x):
        kernels.available()                 # build the attention kernel first: tracing only reads whether it loaded
        try:
            return _compiled_apply()(layer, x)
        except Exception as err:  # noqa: BLE001 - any compiler failure means: run eager
            _compile_failed = True
            log.warning("torch.compile of the inner transformer failed, running it eagerly: %s",
                        str(err).splitlines()[0] if str(err) else type(err).__name__)
    return layer(x)


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """The stochastic depth rule of DeiT and TNT: linear from 0 at the first block to `rate` at the last."""
    return [x.item() for x in torch.linspace(0, rate, depth, device="cpu")]  # cpu: also under torch.device("meta")


def init_vit_weights(model: nn.Module) -> None:
    """ViT/DeiT/TNT initialisation: truncated normal (std .02) for linears and position/cls parameters,
    LayerNorm to identity. Convolutions keep PyTorch's default."""
    for name, param in model.named_parameters(recurse=False):
        nn.init.trunc_normal_(param, std=0.02)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
