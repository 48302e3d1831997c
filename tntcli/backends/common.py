"""What the CPU and CUDA backends share: how a module is given a path, and the paths that serve both."""
from __future__ import annotations

import functools
import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tntcli.models.layers import Attention, DropPath, TransformerLayer

log = logging.getLogger(__name__)
Linear = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def become(module: nn.Module, cls: type) -> nn.Module:
    """Give `module` the forward of `cls`, a subclass of its class that adds no parameters: weights, buffers and
    state-dict names stay the plain model's, so optimisers, EMA and checkpoints cannot tell."""
    if not issubclass(cls, type(module)):
        raise TypeError(f"{cls.__name__} is not a subclass of {type(module).__name__}")
    module.__class__ = cls
    return module


def inner_layers(model: nn.Module) -> list[TransformerLayer]:
    """TNT's inner transformers (one per block that has one); none for DeiT."""
    return [b.inner for b in getattr(model, "blocks", []) if getattr(b, "inner", None) is not None]


# ------------------------------------------------------------------------------------------- class token only
class ClassTokenLayer(TransformerLayer):
    """A class-token model's last layer computing only the row its classifier reads: (B, N, dim) -> (B, 1, dim),
    equal to row 0 of the full layer (keys and values still cover every token)."""
    linear: Linear = staticmethod(F.linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :1] + self.drop_path(self._class_token_attention(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _class_token_attention(self, x: torch.Tensor) -> torch.Tensor:
        a, (B, N, C) = self.attn, x.shape
        H, D, (w, b) = a.num_heads, a.head_dim, (a.qkv.weight, a.qkv.bias)
        q = self.linear(x[:, :1], w[:C], None if b is None else b[:C]).view(B, 1, H, D).transpose(1, 2)
        kv = self.linear(x, w[C:], None if b is None else b[C:]).view(B, N, 2, H, D).permute(2, 0, 3, 1, 4)
        out = a.attend(q, *kv.unbind(0))                                       # B, heads, 1, head_dim
        return a.proj_drop(a.proj(out.transpose(1, 2).reshape(B, 1, C)))


def use_class_token_last_layer(model: nn.Module, linear: Linear = F.linear) -> None:
    """The head reads only the class token after the last block: compute only that row there. Not with SE, whose
    gate pools over all rows. FLOPs stay counted on the plain model (the architecture's nominal cost)."""
    blocks = getattr(model, "blocks", None)
    if not blocks or not hasattr(model, "cls_token"):
        return
    last = getattr(blocks[-1], "outer", blocks[-1])
    if type(last) is TransformerLayer and last.se is None:
        become(last, ClassTokenLayer).linear = linear


# ------------------------------------------------------------------------------------------- attention, compiled layers
class ExplicitAttention(Attention):
    """softmax(q k^T * scale) v as two batched matmuls: for tiny heads, faster to train than SDPA on CPU; one of the
    candidates the CUDA backend measures."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        if self.training and self.attn_drop:
            attn = F.dropout(attn, self.attn_drop)
        return attn @ v


class TensorRateDropPath(DropPath):
    """DropPath with its keep probability in a (non-persistent) buffer: a graph input to `torch.compile`, not a
    constant it specialises on, so one graph serves every layer of a drop-path schedule (0 to 0.1 over the blocks)
    instead of one recompilation per layer until dynamo's recompile limit."""

    def setup(self) -> "TensorRateDropPath":
        self.active = self.rate > 0.0
        self.register_buffer("keep", torch.tensor(1.0 - self.rate), persistent=False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active or not self.training:
            return x
        mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype) < self.keep
        return x * mask / self.keep


@functools.cache
def _compiled_forward():
    # One compiled function for every layer it is given: parameters and buffers are graph inputs, so the inner
    # layers of a TNT share one graph (per input shape and module configuration).
    return torch.compile(lambda layer, x: TransformerLayer.forward(layer, x), dynamic=False)


class CompiledLayer(TransformerLayer):
    """A layer trained through `torch.compile`; eager without gradients (evaluation). Falls back to eager for good,
    with one warning, if compilation fails (for instance no C++ compiler)."""
    failed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and not CompiledLayer.failed:
            try:
                return _compiled_forward()(self, x)
            except Exception as err:  # noqa: BLE001 - any compiler failure means: run eager
                CompiledLayer.failed = True
                log.warning("torch.compile of the inner transformer failed, running it eagerly: %s",
                            str(err).splitlines()[0] if str(err) else type(err).__name__)
        return super().forward(x)


def compile_layer(layer: TransformerLayer) -> None:
    become(layer, CompiledLayer)
    become(layer.drop_path, TensorRateDropPath).setup()
