"""CUDA speed paths, applied to a built model by `apply`.

- TNT's inner attention runs over B*196 sequences (B*576 at 384px) of 16 words with head dim 6 (TNT-S) or 10
  (TNT-B). FlashAttention-2 launches its grid with the batch in the y dimension, capped at 65,535: a per-GPU batch
  of 335 at 224px, or 114 at 384px, fails with "invalid configuration argument". `ChunkedAttention` runs SDPA over
  at most that many sequences at a time.
- Which inner attention is fastest depends on the card, the dtype and the shape: `choose_inner_attention` times
  the candidates (chunked SDPA, explicit matmul-softmax, the inner layer compiled) at the run's shape on the
  device, once, and keeps the fastest.
- The last layer computes only the class token's row.
"""
from __future__ import annotations

import copy
import logging
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tntcli.backends.common import (ExplicitAttention, become, compile_layer, inner_layers,
                                    use_class_token_last_layer)
from tntcli.engine.runtime import autocast, timed
from tntcli.models.layers import Attention, TransformerLayer

MAX_GRID_Y = 65535                     # CUDA's limit on a grid's y dimension
log = logging.getLogger(__name__)


class ChunkedAttention(Attention):
    """SDPA over at most `max_batch` sequences at a time (see the module docstring); (B, N, dim) -> (B, N, dim)."""
    max_batch = MAX_GRID_Y

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        drop = self.attn_drop if self.training else 0.0
        chunks = [F.scaled_dot_product_attention(q[i:i + self.max_batch], k[i:i + self.max_batch],
                                                 v[i:i + self.max_batch], dropout_p=drop, scale=self.scale)
                  for i in range(0, q.shape[0], self.max_batch)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)        # B, heads, N, head_dim


def _chunked(layer: TransformerLayer) -> None:
    become(layer.attn, ChunkedAttention)


def _explicit(layer: TransformerLayer) -> None:
    become(layer.attn, ExplicitAttention)


def _compiled(layer: TransformerLayer) -> None:
    become(layer.attn, ChunkedAttention)
    compile_layer(layer)


INNER_CANDIDATES: dict[str, Callable[[TransformerLayer], None]] = {
    "sdpa": _chunked, "explicit": _explicit, "compiled": _compiled}


def apply(model: nn.Module, *, training: bool, batch_size: int | None, dtype: torch.dtype | None) -> str | None:
    """Give `model` its CUDA paths (in place); returns the inner attention chosen (None for DeiT)."""
    use_class_token_last_layer(model)
    layers = inner_layers(model)
    if not layers:
        return None
    choice = "sdpa"
    if batch_size:
        cfg = model.cfg
        shape = (batch_size * cfg.grid ** 2, cfg.num_words, cfg.word_dim)
        choice = choose_inner_attention(layers[0], shape, dtype, training)
    for layer in layers:
        INNER_CANDIDATES[choice](layer)
    return choice


def choose_inner_attention(layer: TransformerLayer, shape: tuple[int, int, int], dtype: torch.dtype | None,
                           training: bool, reps: int = 5) -> str:
    """Time each candidate on a copy of `layer` at `shape` (a training step's forward and backward, or a forward)
    on the layer's device; the fastest wins. A candidate that fails (out of memory, a launch limit) is skipped."""
    device = next(layer.parameters()).device
    x = torch.randn(shape, device=device, requires_grad=training)
    times = {}
    for name, make in INNER_CANDIDATES.items():
        candidate = copy.deepcopy(layer).train(training)
        make(candidate)
        try:
            times[name] = seconds_per_call(lambda: _step(candidate, x, dtype, training), device, reps)
        except (RuntimeError, torch.OutOfMemoryError) as err:
            log.info("inner attention candidate %s failed at %s: %s", name, shape, str(err).splitlines()[0])
    if not times:
        return "sdpa"
    best = min(times, key=times.get)
    log.info("inner attention: %s (%s)", best, ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()))
    return best


def _step(layer: TransformerLayer, x: torch.Tensor, dtype: torch.dtype | None, training: bool) -> None:
    with autocast(x.device, dtype), torch.set_grad_enabled(training):
        y = layer(x)
    if training:
        y.float().square().mean().backward()


def seconds_per_call(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    """Mean seconds of `fn` over `reps` calls after one warm-up call (which compiles, where it does)."""
    fn()
    return timed(fn, device, reps)
