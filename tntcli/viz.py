"""`tnt viz`: the paper's visualisations (Sec. 3.4, Appendix A.1) for any TNT or DeiT checkpoint we load.

Everything is read through forward pre-hooks on the plain model (no backend applied); its code path is not
changed. Hooks take layer *inputs*: the input of a block (its patch and word embeddings), and the input of each
attention module (normalised tokens), from which the attention probabilities are recomputed as the module defines
them: softmax(q k^T * scale) with q, k from `attn.qkv` (rows q, k, v; `num_heads` heads of `head_dim`). A block's
output is that block run once more, on its hooked inputs.

Figures (blocks are 1-based, as in the paper):
  patch-embeddings   Fig. 3a  channels of the patch (sentence) embeddings after each chosen block, g x g maps
  word-embeddings    Fig. 4   each patch's word embeddings after the block, averaged over channels (TNT)
  inner-attention    Fig. 5   inner-transformer attention of chosen query words over the words of every patch
  patch-attention    Fig. 6   attention between patches (query patch x key patch), averaged over heads
  cls-attention      Fig. 7   attention from the class token to every patch, averaged over heads, over the image
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tntcli.errors import TntError

MAX_CHANNELS = 8                    # channels shown per block in the patch-embedding figure
FIGURES = ("patch-embeddings", "word-embeddings", "inner-attention", "patch-attention", "cls-attention")


# ----------------------------------------------------------------------------------------------- maps
def attention_probs(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, T, C) normalised tokens into `attn` -> (B, heads, T, T) attention probabilities, every query row."""
    q, k, _ = attn.heads(x)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def _is_tnt(model: nn.Module) -> bool:
    return hasattr(model, "word_embed")


def _parse_blocks(blocks: list[int] | None, depth: int) -> list[int]:
    """1-based block numbers (default: first, middle, last) -> 0-based indices."""
    chosen = blocks or sorted({1, (depth + 1) // 2, depth})
    for b in chosen:
        if not 1 <= b <= depth:
            raise TntError(f"--blocks {b} is out of range: the model has blocks 1 to {depth}")
    return [b - 1 for b in chosen]


@torch.no_grad()
def compute_maps(model: nn.Module, image: torch.Tensor, blocks: list[int] | None = None,
                 words: list[int] | None = None) -> dict[str, Any]:
    """The maps behind each figure for one normalised image (1, 3, H, W); blocks 1-based, words 0-based
    (row-major within a patch). Returns numpy arrays, g = patches per side, N = g*g, w = words per side:
      patch_embeddings (n_blocks, d, g, g); patch_attention (n_blocks, N, N); cls_attention (n_blocks, g, g);
      TNT only: word_embeddings (n_blocks, g*w, g*w); inner_attention (n_blocks, n_words, g*w, g*w), NaN for
      blocks without inner transformer; plus blocks (1-based), words, grid, words_per_side."""
    model.eval()
    tnt = _is_tnt(model)
    idx = _parse_blocks(blocks, len(model.blocks))
    g = model.cfg.grid
    block_inputs: dict[int, tuple] = {}
    attn_inputs: dict[tuple[str, int], torch.Tensor] = {}
    hooks = []
    for i in idx:
        block = model.blocks[i]
        hooks.append(block.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: block_inputs.__setitem__(i, args), with_kwargs=True))
        layers = {"outer": block.outer, "inner": block.inner} if tnt else {"outer": block}
        for kind, layer in layers.items():
            if layer is not None:
                hooks.append(layer.attn.register_forward_pre_hook(
                    lambda m, args, key=(kind, i): attn_inputs.__setitem__(key, args[0])))
    try:
        model(image)
    finally:
        for h in hooks:
            h.remove()
    out: dict[str, Any] = {"blocks": [i + 1 for i in idx], "grid": g}
    sentences, word_maps, inner_maps = [], [], []
    if tnt:
        w = model.cfg.words_per_side
        words = list(words) if words else sorted({0, (w // 2) * w + w // 2})
        for j in words:
            if not 0 <= j < w * w:
                raise TntError(f"--words {j} is out of range: a patch has words 0 to {w * w - 1} (row-major)")
        out.update(words=words, words_per_side=w)
    for i in idx:
        block = model.blocks[i]
        if tnt:
            word_in, sent_in = block_inputs[i][:2]
            word_out, sent_out = block(word_in, sent_in)
            word_maps.append(_tile(word_out.mean(-1), g, w))                      # (N, m) -> (g*w, g*w)
            if ("inner", i) in attn_inputs:
                probs = attention_probs(block.inner.attn, attn_inputs[("inner", i)]).mean(1)   # (N, m, m)
                inner_maps.append(np.stack([_tile(probs[:, j, :], g, w) for j in words]))
            else:
                inner_maps.append(np.full((len(words), g * w, g * w), np.nan))
            outer_attn = block.outer.attn
        else:
            sent_out = block(block_inputs[i][0])
            outer_attn = block.attn
        sentences.append(sent_out[0, 1:].T.reshape(-1, g, g).numpy())             # (d, g, g)
        probs = attention_probs(outer_attn, attn_inputs[("outer", i)])[0].mean(0)  # (N+1, N+1)
        out.setdefault("patch_attention", []).append(probs[1:, 1:].numpy())
        out.setdefault("cls_attention", []).append(probs[0, 1:].reshape(g, g).numpy())
    out["patch_embeddings"] = np.stack(sentences)
    out["patch_attention"] = np.stack(out["patch_attention"])
    out["cls_attention"] = np.stack(out["cls_attention"])
    if tnt:
        out["word_embeddings"] = np.stack(word_maps)
        out["inner_attention"] = np.stack(inner_maps)
    return out


def _tile(per_word: torch.Tensor, g: int, w: int) -> np.ndarray:
    """(N, w*w) values per patch and word -> (g*w, g*w) image: each patch's words at its place in the image."""
    return per_word.reshape(g, g, w, w).permute(0, 2, 1, 3).reshape(g * w, g * w).numpy()


# ----------------------------------------------------------------------------------------------- images
def load_image(path: str | Path, img_size: int, mean, std, crop_pct: float, interpolation: str
               ) -> tuple[torch.Tensor, np.ndarray]:
    """The model's eval view of an image file: (1, 3, S, S) normalised, and the same crop as (S, S, 3) uint8."""
    from PIL import Image, UnidentifiedImageError

    from tntcli.data.augment import ImagePipeline
    from tntcli.data.pipelines import eval_transform

    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise TntError(f"cannot read image {path}: {err}") from None
    crop = eval_transform(img_size, crop_pct=crop_pct, interpolation=interpolation)(rgb)       # (3, S, S) uint8
    # normalised as the eval loaders do, by the same code
    return ImagePipeline(None, mean=mean, std=std)(crop[None]), crop.permute(1, 2, 0).numpy()


def _parse_ints(flag: str, text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise TntError(f"{flag} expects comma-separated whole numbers, got '{text}'") from None


def visualize(checkpoint: str | Path, image: str | Path, out: str | Path, model_name: str | None = None,
              blocks: str | None = None, words: str | None = None, ema: bool = False) -> list[Path]:
    """Write the figures' PNGs for one checkpoint and one image into `out`; returns the files written."""
    from tntcli.models.weights import load_checkpoint
    from tntcli.models.registry import get_spec

    if not Path(image).is_file():
        raise TntError(f"image {image} not found")
    model, name = load_checkpoint(checkpoint, model_name, ema=ema)
    spec = get_spec(name)
    tensor, shown = load_image(image, model.cfg.img_size, spec.mean, spec.std, spec.crop_pct, spec.interpolation)
    maps = compute_maps(model, tensor, _parse_ints("--blocks", blocks), _parse_ints("--words", words))
    title = f"{name}, {Path(checkpoint).name}, {Path(image).name}"
    return write_figures(maps, shown, Path(out), title)


def write_figures(maps: dict[str, Any], shown: np.ndarray, out: Path, title: str) -> list[Path]:
    from tntcli.results import pyplot

    plt = pyplot()
    out.mkdir(parents=True, exist_ok=True)
    blocks, written = maps["blocks"], []

    def save(fig, stem: str) -> None:
        fig.suptitle(f"{title}: {stem.replace('-', ' ')}", fontsize=9)
        path = out / f"{stem}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        fig.savefig(tmp, format="png", dpi=72, bbox_inches="tight")
        plt.close(fig)
        tmp.replace(path)
        written.append(path)

    emb = maps["patch_embeddings"]
    channels = min(MAX_CHANNELS, emb.shape[1])
    fig, axes = plt.subplots(len(blocks), channels + 1, figsize=(1.3 * (channels + 1), 1.4 * len(blocks)),
                             squeeze=False)
    for row, b in enumerate(blocks):
        axes[row][0].imshow(shown)
        axes[row][0].set_ylabel(f"block {b}", fontsize=8)
        for c in range(channels):
            axes[row][c + 1].imshow(emb[row, c], cmap="viridis")
            axes[row][c + 1].set_title(f"ch {c}", fontsize=7) if row == 0 else None
    _clean(axes)
    save(fig, "patch-embeddings")

    if "word_embeddings" in maps:
        fig, axes = plt.subplots(1, len(blocks) + 1, figsize=(1.8 * (len(blocks) + 1), 2), squeeze=False)
        axes[0][0].imshow(shown)
        for k, b in enumerate(blocks):
            axes[0][k + 1].imshow(maps["word_embeddings"][k], cmap="viridis")
            axes[0][k + 1].set_title(f"block {b}", fontsize=8)
        _clean(axes)
        save(fig, "word-embeddings")

        words, w = maps["words"], maps["words_per_side"]
        fig, axes = plt.subplots(len(blocks), len(words), figsize=(1.9 * len(words), 1.9 * len(blocks)),
                                 squeeze=False)
        for row, b in enumerate(blocks):
            for col, j in enumerate(words):
                ax, values = axes[row][col], maps["inner_attention"][row, col]
                if np.isnan(values).all():
                    ax.text(0.5, 0.5, "no inner\ntransformer", ha="center", va="center", fontsize=7)
                else:
                    ax.imshow(values, cmap="magma")
                ax.set_title(f"block {b}, query word {j} ({j // w},{j % w})", fontsize=7)
        _clean(axes)
        save(fig, "inner-attention")

    fig, axes = plt.subplots(1, len(blocks), figsize=(2.6 * len(blocks), 2.6), squeeze=False)
    for k, b in enumerate(blocks):
        axes[0][k].imshow(maps["patch_attention"][k], cmap="magma")
        axes[0][k].set_title(f"block {b}: query patch (rows) x key patch", fontsize=7)
    _clean(axes)
    save(fig, "patch-attention")

    size = shown.shape[0]
    fig, axes = plt.subplots(1, len(blocks) + 1, figsize=(1.9 * (len(blocks) + 1), 2), squeeze=False)
    axes[0][0].imshow(shown)
    for k, b in enumerate(blocks):
        axes[0][k + 1].imshow(shown)
        axes[0][k + 1].imshow(maps["cls_attention"][k], cmap="jet", alpha=0.5, extent=(0, size, size, 0),
                              interpolation="bilinear")
        axes[0][k + 1].set_title(f"block {b}", fontsize=8)
    _clean(axes)
    save(fig, "cls-attention")
    return written


def _clean(axes) -> None:
    for row in axes:
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
