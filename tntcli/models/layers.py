"""Layers shared by TNT and DeiT: drop-path, attention, MLP, squeeze-excite and the pre-norm transformer layer.

Every transformer in the toolkit (DeiT's blocks, TNT's inner and outer transformers) is a `TransformerLayer`. This
file is the plain math, the reference every speed path is tested against: the speed paths (oneDNN linears, the C++
tiny-attention kernel, compiled inner layers, CUDA attention choices) live in `tntcli/backends/` and are applied to
a built model by the code that runs it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
    """Multi-head self-attention: softmax(q k^T / sqrt(head_dim)) v per head, (B, N, dim) -> (B, N, dim).

    One fused qkv projection (rows q, k, v). The official TNT code keeps separate `qk` and `v` projections; their
    weights concatenate into `qkv` exactly, so checkpoints convert without changing a number (models/weights.py).
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        x = self.attend(*self.heads(x))                                         # B, heads, N, head_dim
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, dim) -> q, k, v, each (B, heads, N, head_dim)."""
        B, N, _ = x.shape
        return self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T * scale) v per head (what a backend may compute another way)."""
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0,
                                              scale=self.scale)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear, as in ViT."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


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
    """Pre-norm transformer layer, (B, N, dim) -> (B, N, dim): x += drop_path(attn(norm(x))); x += drop_path(mlp(norm(x))).

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        y = self.mlp(self.norm2(x))
        if self.se is not None:
            y = y + self.se(y)
        return x + self.drop_path(y)


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
