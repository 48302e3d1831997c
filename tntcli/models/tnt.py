"""Transformer in Transformer (Han et al., NeurIPS 2021, arXiv 2103.00112).

An image is cut into patches ("visual sentences"), each patch into words ("visual words"). Every block runs an
inner transformer over the words of each patch, adds a projection of the words to the patch token, then runs an
outer transformer over the patches. Shapes (TNT-S, 224px): words (B*196, 16, 24), sentences (B, 197, 384).

The architecture follows the official `tnt_pytorch/tnt.py`; `legacy=True` gives timm's pre-2025 variant (stem conv
over the whole image, per-word LayerNorm and biased projection in the blocks, no post-projection norm).
Checkpoint converters for the official release and timm sit at the bottom of this file.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tntcli.models.layers import TransformerLayer, drop_path_rates, init_vit_weights


@dataclass
class TNTConfig:
    dim: int = 384                     # sentence (patch) embedding d
    word_dim: int = 24                 # word embedding c
    depth: int = 12
    heads: int = 6                     # outer attention heads
    inner_heads: int = 4
    inner_stride: int = 4              # 16px patch / stride 4 -> 4x4 = 16 words
    mlp_ratio: float = 4.0
    inner_mlp_ratio: float = 4.0
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    qkv_bias: bool = False
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    inner_blocks: tuple[int, ...] | None = None   # 0-based blocks that keep an inner transformer; None = all
    word_pos: bool = True
    sentence_pos: bool = True
    se: bool = False                   # SE module on the outer MLP (paper appendix, TNT-S-SE)
    legacy: bool = False               # timm's tnt_s_legacy_patch16_224 layout
    norm_eps: float = 1e-5

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def words_per_side(self) -> int:
        return -(-self.patch_size // self.inner_stride)

    @property
    def num_words(self) -> int:
        return self.words_per_side ** 2

    def has_inner(self, block: int) -> bool:
        return self.inner_blocks is None or block in self.inner_blocks


class WordEmbed(nn.Module):
    """Image -> words: Conv2d(3, c, k=7, stride, pad=3) on every 16x16 patch separately (zero padding at each
    patch border, as in the official code). Legacy: the conv runs over the whole image, then is cut into patches."""

    def __init__(self, cfg: TNTConfig):
        super().__init__()
        self.grid, self.patch, self.legacy = cfg.grid, cfg.patch_size, cfg.legacy
        self.proj = nn.Conv2d(cfg.in_chans, cfg.word_dim, kernel_size=7, padding=3, stride=cfg.inner_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        g, p = self.grid, self.patch
        if H != g * p or W != g * p:
            raise ValueError(f"input is {H}x{W}, the model was built for {g * p}x{g * p}")
        if self.legacy:
            x = self.proj(x)                                            # B, c, g*w, g*w
            c, w = x.shape[1], x.shape[2] // g
            x = x.view(B, c, g, w, g, w).permute(0, 2, 4, 3, 5, 1)      # B, g, g, w, w, c
            return x.reshape(B * g * g, w * w, c)
        x = x.view(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B * g * g, C, p, p)
        x = self.proj(x)                                                # B*N, c, w, w
        # One explicit copy to (B*N, w*w, c) row-major: a transposed view here would keep its strides through
        # every residual add of the inner transformer and cost a hidden copy in each LayerNorm and reshape.
        return x.flatten(2).transpose(1, 2).contiguous()                # B*N, w*w, c


class WordsToSentence(nn.Module):
    """Flatten the words of each patch and project them to a sentence vector: LN(W*c) -> Linear -> LN(d).

    The stem uses a biased projection; blocks an unbiased one. `legacy` is timm's older form: LN(c) on each word
    before flattening, biased projection, no output norm.
    """

    def __init__(self, num_words: int, word_dim: int, dim: int, bias: bool, legacy: bool = False, eps: float = 1e-5):
        super().__init__()
        self.legacy = legacy
        self.norm_in = nn.LayerNorm(word_dim if legacy else num_words * word_dim, eps=eps)
        self.proj = nn.Linear(num_words * word_dim, dim, bias=bias)
        self.norm_out = nn.Identity() if legacy else nn.LayerNorm(dim, eps=eps)

    def forward(self, words: torch.Tensor, batch: int) -> torch.Tensor:
        """(batch * patches, words, c) -> (batch, patches, d)."""
        if self.legacy:
            return self.proj(self.norm_in(words).reshape(batch, -1, self.proj.in_features))
        return self.norm_out(self.proj(self.norm_in(words.reshape(batch, -1, self.proj.in_features))))


class TNTBlock(nn.Module):
    """Inner transformer on words -> add the words' projection to the patch tokens -> outer transformer."""

    def __init__(self, cfg: TNTConfig, drop_path: float, has_inner: bool):
        super().__init__()
        common = dict(qkv_bias=cfg.qkv_bias, drop=cfg.drop_rate, attn_drop=cfg.attn_drop_rate,
                      drop_path=drop_path, norm_eps=cfg.norm_eps)
        self.inner = self.words_to_sentence = None
        if has_inner:
            self.inner = TransformerLayer(cfg.word_dim, cfg.inner_heads, cfg.inner_mlp_ratio, **common)
            self.words_to_sentence = WordsToSentence(cfg.num_words, cfg.word_dim, cfg.dim, bias=cfg.legacy,
                                                     legacy=cfg.legacy, eps=cfg.norm_eps)
        self.outer = TransformerLayer(cfg.dim, cfg.heads, cfg.mlp_ratio, se=cfg.se, **common)

    def forward(self, words: torch.Tensor, sentences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """words (B*patches, words, c), sentences (B, 1 + patches, d) -> the same shapes."""
        if self.inner is not None:
            words = self.inner(words)
            # The cls token (row 0) gets no words: a zero row padded onto the projection instead of slice + cat,
            # so backward passes the sentences' gradient straight through (no zero-filled slice gradients).
            sentences = sentences + F.pad(self.words_to_sentence(words, sentences.shape[0]), (0, 0, 1, 0))
        return words, self.outer(sentences)


class TNT(nn.Module):
    pos_key = "sentence_pos"                                            # resized when img_size changes

    def __init__(self, cfg: TNTConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"img_size {cfg.img_size} is not a multiple of the patch size {cfg.patch_size}")
        self.word_embed = WordEmbed(cfg)
        self.word_pos = nn.Parameter(torch.zeros(1, cfg.num_words, cfg.word_dim)) if cfg.word_pos else None
        self.sentence_embed = WordsToSentence(cfg.num_words, cfg.word_dim, cfg.dim, bias=True, eps=cfg.norm_eps)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        n = cfg.grid ** 2 + 1
        self.sentence_pos = nn.Parameter(torch.zeros(1, n, cfg.dim)) if cfg.sentence_pos else None
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(TNTBlock(cfg, dp, cfg.has_inner(i))
                                    for i, dp in enumerate(drop_path_rates(cfg.drop_path_rate, cfg.depth)))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.grad_checkpointing = False
        init_vit_weights(self)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "word_pos", "sentence_pos"}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them: less training memory, about
        one more forward of time. Same outputs and gradients (dropout/drop-path RNG state is replayed)."""
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        words = self.word_embed(x)
        if self.word_pos is not None:
            words = words + self.word_pos
        sentences = torch.cat([self.cls_token.expand(B, -1, -1), self.sentence_embed(words, B)], dim=1)
        if self.sentence_pos is not None:
            sentences = sentences + self.sentence_pos
        sentences = self.pos_drop(sentences)
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                words, sentences = checkpoint(block, words, sentences, use_reentrant=False)
            else:
                words, sentences = block(words, sentences)
        return self.norm(sentences[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> logits (B, classes)."""
        return self.head(self.forward_features(x))


# --------------------------------------------------------------------------------- checkpoint converters
# Each takes a foreign state dict and returns ours (or the reverse for exports). Attention weights: foreign `qk`
# (2d x d) and `v` (d x d) stack into our fused `qkv` (3d x d) without changing a number.

_OFFICIAL_BLOCK = {  # official name -> ours, inside blocks.i
    "inner_norm1": "inner.norm1", "inner_attn": "inner.attn", "inner_norm2": "inner.norm2", "inner_mlp": "inner.mlp",
    "proj_norm1": "words_to_sentence.norm_in", "proj": "words_to_sentence.proj",
    "proj_norm2": "words_to_sentence.norm_out",
    "outer_norm1": "outer.norm1", "outer_attn": "outer.attn", "outer_norm2": "outer.norm2", "outer_mlp": "outer.mlp",
    "se_layer.fc.0": "outer.se.norm", "se_layer.fc.1": "outer.se.fc1", "se_layer.fc.3": "outer.se.fc2",
}
_OFFICIAL_TOP = {
    "patch_embed.proj": "word_embed.proj", "inner_pos": "word_pos", "outer_pos": "sentence_pos",
    "proj_norm1": "sentence_embed.norm_in", "proj": "sentence_embed.proj", "proj_norm2": "sentence_embed.norm_out",
    "cls_token": "cls_token", "norm": "norm", "head": "head",
}
# timm (>= 1.0.16, both layouts) uses other names for the same modules.
_TIMM_TO_OFFICIAL_BLOCK = {
    "norm_in": "inner_norm1", "attn_in": "inner_attn", "norm_mlp_in": "inner_norm2", "mlp_in": "inner_mlp",
    "norm1_proj": "proj_norm1", "proj": "proj", "norm2_proj": "proj_norm2",
    "norm_out": "outer_norm1", "attn_out": "outer_attn", "norm_mlp": "outer_norm2", "mlp": "outer_mlp",
}
_TIMM_TO_OFFICIAL_TOP = {
    "pixel_embed.proj": "patch_embed.proj", "pixel_pos": "inner_pos", "patch_pos": "outer_pos",
    "norm1_proj": "proj_norm1", "proj": "proj", "norm2_proj": "proj_norm2",
    "cls_token": "cls_token", "norm": "norm", "head": "head",
}


def _rename(key: str, top: dict[str, str], block: dict[str, str]) -> str | None:
    """Map `key` through the longest matching module prefix; None when nothing matches."""
    parts = key.split(".")
    if parts[0] == "blocks":
        prefix, rest, table = ".".join(parts[:2]) + ".", parts[2:], block
    else:
        prefix, rest, table = "", parts, top
    for n in range(len(rest), 0, -1):
        head = ".".join(rest[:n])
        if head in table:
            return prefix + ".".join([table[head], *rest[n:]])
    return None


def _fuse_qk_v(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in sd.items():
        if ".attn.qk." in k:
            out[k.replace(".attn.qk.", ".attn.qkv.")] = torch.cat([v, sd[k.replace(".attn.qk.", ".attn.v.")]])
        elif ".attn.v." not in k:
            out[k] = v
    return out


def convert_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official Efficient-AI-Backbones TNT (also used for SE models) -> ours."""
    out = {}
    for k, v in sd.items():
        if k == "outer_tokens":          # the unused (1, 196, d) zero parameter of the official code
            continue
        new = _rename(k, _OFFICIAL_TOP, _OFFICIAL_BLOCK)
        if new is None:
            raise KeyError(k)
        out[new] = v
    return _fuse_qk_v(out)


def convert_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm `tnt_*_patch16_224` (either layout; `pixel_pos` is (1, c, 4, 4) there) -> ours."""
    official = {}
    for k, v in sd.items():
        new = _rename(k, _TIMM_TO_OFFICIAL_TOP, _TIMM_TO_OFFICIAL_BLOCK)
        if new is None:
            raise KeyError(k)
        if k == "pixel_pos":             # (1, c, h, w) -> (1, h*w, c)
            v = v.flatten(2).transpose(1, 2)
        official[new] = v
    return convert_official(official)


def export_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> timm `tnt_*_patch16_224` state dict (so our checkpoints load into timm)."""
    to_official_top = {v: k for k, v in _OFFICIAL_TOP.items()}
    to_official_block = {v: k for k, v in _OFFICIAL_BLOCK.items()}
    from_official_top = {v: k for k, v in _TIMM_TO_OFFICIAL_TOP.items()}
    from_official_block = {v: k for k, v in _TIMM_TO_OFFICIAL_BLOCK.items()}
    out = {}
    for k, v in sd.items():
        if ".attn.qkv." in k:            # split fused qkv back into qk and v
            d = v.shape[0] // 3
            for part, tensor in (("qk", v[: 2 * d]), ("v", v[2 * d:])):
                kk = k.replace(".attn.qkv.", f".attn.{part}.")
                out[_rename(_rename(kk, to_official_top, to_official_block), from_official_top,
                            from_official_block)] = tensor
            continue
        official = _rename(k, to_official_top, to_official_block)
        timm_key = _rename(official, from_official_top, from_official_block) if official else None
        if timm_key is None:
            raise KeyError(f"{k} has no timm equivalent (SE and ablation variants do not export)")
        if k == "word_pos":              # (1, h*w, c) -> (1, c, h, w)
            side = int(v.shape[1] ** 0.5)
            v = v.transpose(1, 2).reshape(1, v.shape[2], side, side)
        out[timm_key] = v
    return out
