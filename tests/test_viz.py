"""`tnt viz`: the paper's visualisations read through hooks on the plain model, for TNT and DeiT checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tntcli.models.weights import save_model
from tntcli.models.registry import create_model
from tntcli.viz import attention_probs, compute_maps, visualize

# 32px, 8px patches (4x4 grid) of 4x4 words (inner stride 2), three blocks, inner transformer in blocks 1 and 3
TNT_ARCH = dict(depth=3, patch_size=8, inner_stride=2, dim=32, heads=2, word_dim=8, inner_heads=2, img_size=32,
                num_classes=5, inner_blocks=(0, 2))


def tiny_tnt():
    torch.manual_seed(0)
    return create_model("tnt-ti", **TNT_ARCH).eval()


def image(seed: int) -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_maps_have_the_figures_shapes_and_attention_rows_are_distributions():
    maps = compute_maps(tiny_tnt(), image(0), blocks=[1, 2, 3], words=[0, 5, 15])
    assert maps["blocks"] == [1, 2, 3] and maps["grid"] == 4 and maps["words_per_side"] == 4
    assert maps["patch_embeddings"].shape == (3, 32, 4, 4)                  # d channels of a 4x4 patch grid
    assert maps["word_embeddings"].shape == (3, 16, 16)                     # 4x4 patches of 4x4 words
    assert maps["inner_attention"].shape == (3, 3, 16, 16)                  # blocks x query words
    assert maps["patch_attention"].shape == (3, 16, 16) and maps["cls_attention"].shape == (3, 4, 4)
    assert np.isnan(maps["inner_attention"][1]).all()                       # block 2 has no inner transformer
    inner = maps["inner_attention"][0, 0].reshape(4, 4, 4, 4).transpose(0, 2, 1, 3).reshape(16, 16)
    assert inner.sum(axis=1) == pytest.approx(np.ones(16), abs=1e-5)        # each patch: the query's row sums to 1
    assert (maps["patch_attention"].sum(-1) < 1).all()                      # the share given to the cls token is left out


def test_maps_change_with_the_input():
    model = tiny_tnt()
    a, b = compute_maps(model, image(0)), compute_maps(model, image(1))
    for key in ("patch_embeddings", "word_embeddings", "inner_attention", "patch_attention", "cls_attention"):
        assert not np.allclose(np.nan_to_num(a[key]), np.nan_to_num(b[key])), key


def test_hooked_attention_reproduces_the_modules_own_output():
    """probs @ v through attn.proj equals what the attention module returned in the forward pass."""
    model = tiny_tnt()
    seen = {}
    attn = model.blocks[0].outer.attn
    handle = attn.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    with torch.no_grad():
        model(image(0))
        handle.remove()
        x = seen["x"]
        B, T, C = x.shape
        v = attn.qkv(x).view(B, T, 3, attn.num_heads, attn.head_dim)[:, :, 2].transpose(1, 2)
        mixed = (attention_probs(attn, x) @ v).transpose(1, 2).reshape(B, T, C)
        assert torch.allclose(attn.proj(mixed), seen["out"], atol=1e-5)


def test_the_last_blocks_maps_cover_every_patch_although_the_model_computes_only_the_class_row():
    maps = compute_maps(tiny_tnt(), image(0), blocks=[3])
    assert np.isfinite(maps["patch_embeddings"]).all() and maps["patch_attention"].shape == (1, 16, 16)


@pytest.mark.parametrize("name,arch", [("tnt-ti", TNT_ARCH),
                                       ("deit-ti", dict(depth=2, patch_size=8, dim=32, heads=2, img_size=32,
                                                        num_classes=5))])
def test_viz_writes_pngs_for_our_checkpoints(tmp_path, name, arch):
    ckpt = save_model(create_model(name, **arch), name, tmp_path / f"{name}.pt")
    img = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(img)
    from typer.testing import CliRunner

    from tntcli.cli import app

    result = CliRunner().invoke(app, ["viz", "--checkpoint", str(ckpt), "--image", str(img), "--out",
                                      str(tmp_path / "viz"), "--blocks", "1,2"])
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in (tmp_path / "viz").glob("*.png"))
    expected = ["cls-attention.png", "inner-attention.png", "patch-attention.png", "patch-embeddings.png",
                "word-embeddings.png"]
    assert names == (expected if name == "tnt-ti" else ["cls-attention.png", "patch-attention.png",
                                                          "patch-embeddings.png"])
    for p in (tmp_path / "viz").glob("*.png"):
        with Image.open(p) as png:
            assert png.size[0] > 50 and p.stat().st_size < 200_000


@pytest.mark.parametrize("args,message", [(["--blocks", "4"], "--blocks 4 is out of range"),
                                          (["--words", "16"], "--words 16 is out of range"),
                                          (["--blocks", "x"], "--blocks expects")])
def test_bad_viz_input_is_one_line(tmp_path, args, message):
    ckpt = save_model(tiny_tnt(), "tnt-ti", tmp_path / "m.pt")
    img = tmp_path / "i.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(img)
    from tntcli.errors import TntError

    with pytest.raises(TntError, match=message):
        visualize(ckpt, img, tmp_path / "o", blocks=args[1] if args[0] == "--blocks" else None,
                  words=args[1] if args[0] == "--words" else None)
    with pytest.raises(TntError, match="cannot read image"):
        visualize(ckpt, ckpt, tmp_path / "o")
