"""Every `tnt ablate` variant builds exactly the architecture it names: the modules it keeps or drops, and its
parameters and MACs against the closed forms of test_flops.py (Eq. 17/18 and the parts the paper leaves out)."""
from __future__ import annotations

import pytest

from tntcli.ablate import AblationFlags, model_cfg, plan_variants
from tntcli.config import build_config
from tntcli.flops import count_macs, trainable_params
from tntcli.models.registry import build_model

from test_flops import tnt_macs, tnt_params

# TNT-S's widths at a small depth and resolution: d=384, c=24, 16 words, 4 inner heads; depth 4, 64px (4x4 grid)
BASE = {"model": {"name": "tnt-s", "img_size": 64, "arch": {"depth": 4}}, "data": {"data": "digits"}}


def variants(**flags):
    every = dict(no_inner=False, inner_blocks=[], no_word_pos=False, no_sentence_pos=False, inner_heads=None,
                 words=None, se=False)
    return {v.name: v for v in plan_variants(build_config(BASE), AblationFlags(**{**every, **flags}))}


def built(v):
    c = model_cfg(v.cfg)
    return c, build_model(c)


def assert_counts(c, model):
    assert trainable_params(model) == tnt_params(c)
    assert count_macs(model, c.img_size).total() == tnt_macs(c)


def test_baseline_is_the_recipes_model():
    c, model = built(variants(se=True)["baseline"])
    assert (c.depth, c.dim, c.word_dim, c.num_words, c.inner_heads, c.img_size) == (4, 384, 24, 16, 4, 64)
    assert all(b.inner is not None for b in model.blocks) and model.word_pos is not None
    assert_counts(c, model)


def test_no_inner_drops_every_inner_transformer_but_keeps_the_word_stem():
    c, model = built(variants(no_inner=True)["no-inner"])
    assert all(b.inner is None and b.words_to_sentence is None for b in model.blocks)
    assert model.word_embed is not None and model.sentence_embed is not None
    assert_counts(c, model)
    base_c, base = built(variants(no_inner=True)["baseline"])
    inner_layer = 12 * 24 ** 2 + 10 * 24                                     # Eq. 18's inner layer + norms/biases
    to_sentence = 2 * 16 * 24 + 16 * 24 * 384 + 2 * 384
    assert trainable_params(base) - trainable_params(model) == 4 * (inner_layer + to_sentence)


def test_inner_blocks_keep_the_inner_transformer_only_where_named():
    v = variants(inner_blocks=["1,3"])["inner-blocks=1,3"]
    c, model = built(v)
    assert [b.inner is not None for b in model.blocks] == [True, False, True, False]
    assert_counts(c, model)


@pytest.mark.parametrize("flags, name, word_pos, sentence_pos", [
    ({"no_word_pos": True}, "no-word-pos", False, True),
    ({"no_sentence_pos": True}, "no-sentence-pos", True, False),
    ({"no_pos": True}, "no-pos", False, False),             # its own flag: --no-pos
])
def test_position_encoding_variants_drop_exactly_their_embedding(flags, name, word_pos, sentence_pos):
    c, model = built(variants(**flags)[name])
    assert (model.word_pos is not None, model.sentence_pos is not None) == (word_pos, sentence_pos)
    assert ("word_pos" in model.state_dict(), "sentence_pos" in model.state_dict()) == (word_pos, sentence_pos)
    assert_counts(c, model)
    _, base = built(variants(**flags)["baseline"])
    dropped = (0 if word_pos else 16 * 24) + (0 if sentence_pos else 17 * 384)
    assert trainable_params(base) - trainable_params(model) == dropped


@pytest.mark.parametrize("heads", [1, 2, 4, 6, 8])
def test_inner_heads_split_the_word_dim_without_changing_params_or_macs(heads):
    found = variants(inner_heads="1,2,4,6,8")
    v = found.get(f"inner-heads={heads}") or found["baseline"]                # 4 heads is the baseline itself
    c, model = built(v)
    for block in model.blocks:
        attn = block.inner.attn
        assert (attn.num_heads, attn.head_dim) == (heads, 24 // heads)
        assert attn.scale == pytest.approx((24 // heads) ** -0.5, rel=1e-12)
    assert_counts(c, model)                                                   # heads change neither count


@pytest.mark.parametrize("words, stride, word_dim", [(4, 8, 96), (16, 4, 24), (64, 2, 6)])
def test_words_variants_keep_words_times_word_dim(words, stride, word_dim):
    found = variants(words="4,16,64")
    c, model = built(found.get(f"words={words}") or found["baseline"])
    assert (c.num_words, c.inner_stride, c.word_dim) == (words, stride, word_dim)
    assert c.num_words * c.word_dim == 16 * 24
    assert model.word_embed.proj.stride == (stride, stride)
    assert_counts(c, model)


def test_se_adds_the_squeeze_excite_to_every_outer_layer():
    c, model = built(variants(se=True)["se"])
    assert all(b.outer.se is not None and b.inner.se is None for b in model.blocks)
    assert_counts(c, model)
