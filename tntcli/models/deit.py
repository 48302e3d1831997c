"""DeiT (Touvron et al., 2021): the plain ViT baseline TNT is compared against, sharing TNT's layers.

Module names follow timm's `VisionTransformer`, so a timm `deit_*_patch16_224` state dict loads as it is.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tntcli.models.layers import TransformerLayer, drop_path_rates, init_vit_weights


@dataclass
class DeiTConfig:
    dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6             # timm's ViT uses 1e-6, unlike TNT's 1e-5

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


class PatchEmbed(nn.Module):
    def __init__(self, cfg: DeiTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_chans, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DeiT(nn.Module):
    pos_key = "pos_embed"

    def __init__(self, cfg: DeiTConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.img_size % cfg.patch_size:
            raise ValueError(f"img_size {cfg.img_size} is not a multiple of the patch size {cfg.patch_size}")
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid ** 2 + 1, cfg.dim))
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.Sequential(*[
            TransformerLayer(cfg.dim, cfg.heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, drop=cfg.drop_rate,
                             attn_drop=cfg.attn_drop_rate, drop_path=dp, norm_eps=cfg.norm_eps)
            for dp in drop_path_rates(cfg.drop_path_rate, cfg.depth)])
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        init_vit_weights(self)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self.pos_drop(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed)
        return self.norm(self.blocks(x)[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> logits (B, classes)."""
        return self.head(self.forward_features(x))


def convert_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm `deit_*_patch16_224` -> ours: same names; timm's distilled variants are not supported."""
    if "dist_token" in sd:
        raise KeyError("dist_token (distilled DeiT checkpoints are not supported)")
    return {k: v for k, v in sd.items()}


export_timm = convert_timm
