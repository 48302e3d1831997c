"""The TNT and DeiT architectures: shapes, ablation knobs, stochastic depth and config validation.

Numerical equality with the official/timm implementations is proven in test_checkpoints.py; here reduced depths
(1-4 blocks) are enough, since every block is built the same way.
"""
import pytest
import torch
from torch import nn

from tntcli.errors import TntError
from tntcli.models import MODELS, create_model, model_config
from tntcli.models.layers import DropPath, drop_path_rates


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def logits(model: torch.nn.Module, img_size: int = 224, seed: int = 0) -> torch.Tensor:
    x = torch.randn(1, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model.eval()(x)


# ------------------------------------------------------------------------------------------ TNT structure
def test_tnt_s_shapes_follow_the_paper():
    """16 words of dim 24 per 16x16 patch, 196 patches + cls of dim 384."""
    model = create_model("tnt-s", depth=2)
    assert model.word_pos.shape == (1, 16, 24)
    assert model.sentence_pos.shape == (1, 197, 384)
    assert model.word_embed.proj.kernel_size == (7, 7) and model.word_embed.proj.stride == (4, 4)
    assert model.sentence_embed.norm_in.normalized_shape == (16 * 24,)
    assert model.sentence_embed.norm_out.normalized_shape == (384,)
    assert logits(model).shape == (1, 1000)


def test_block_projection_from_words_is_unbiased_but_the_stem_projection_is_biased():
    model = create_model("tnt-s", depth=1)
    assert model.blocks[0].words_to_sentence.proj.bias is None
    assert model.sentence_embed.proj.bias is not None


def test_words_are_embedded_per_patch_so_one_patch_does_not_leak_into_its_neighbours_words():
    """The official stem convolves each 16x16 patch on its own (zero padding at patch borders)."""
    model = create_model("tnt-s", depth=1).eval()
    x = torch.randn(1, 3, 224, 224)
    y = x.clone()
    y[..., :16, :16] += 1.0                                        # change patch 0 only
    with torch.no_grad():
        changed = (model.word_embed(x) != model.word_embed(y)).flatten(1).any(1)
    assert changed.nonzero().flatten().tolist() == [0]


def test_legacy_stem_convolves_the_whole_image_so_neighbouring_patches_see_each_other():
    model = create_model("tnt-s-legacy", depth=1).eval()
    x = torch.randn(1, 3, 224, 224)
    y = x.clone()
    y[..., :16, :16] += 1.0
    with torch.no_grad():
        changed = (model.word_embed(x) != model.word_embed(y)).flatten(1).any(1)
    assert changed.nonzero().flatten().tolist() == [0, 1, 14, 15]  # patch 0 and its right/lower neighbours


def test_cls_token_gets_no_words():
    """Only patch tokens receive the projected words; the cls token passes the word projection unchanged. The
    block's zero-row pad must equal the plain slice + concatenate, bit for bit."""
    block = create_model("tnt-s", depth=1).blocks[0].eval()
    block.outer.forward = lambda sentences: sentences   # outer transformer as the identity
    words, sentences = torch.randn(2 * 196, 16, 24), torch.randn(2, 197, 384)
    with torch.no_grad():
        _, out = block(words, sentences)
        inner = block.inner(words)
        reference = torch.cat([sentences[:, :1], sentences[:, 1:] + block.words_to_sentence(inner, 2)], dim=1)
    assert torch.equal(out[:, 0], sentences[:, 0])
    assert not torch.allclose(out[:, 1:], sentences[:, 1:])
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


def test_input_of_another_size_is_refused():
    with pytest.raises(ValueError, match="built for 224x224"):
        logits(create_model("tnt-s", depth=1), img_size=256)


# ------------------------------------------------------------------------------------------ ablation knobs
def test_no_inner_blocks_removes_every_inner_transformer_but_keeps_the_word_stem():
    model = create_model("tnt-s", depth=2, inner_blocks=())
    assert not any(".inner." in k or "words_to_sentence" in k for k in model.state_dict())
    before = logits(model)
    with torch.no_grad():
        model.word_embed.proj.weight.mul_(2)                      # sentences are still built from the words
    assert not torch.allclose(before, logits(model))


def test_inner_blocks_keeps_inner_transformers_only_in_the_named_blocks():
    model = create_model("tnt-s", depth=4, inner_blocks=(0, 3))
    assert [block.inner is not None for block in model.blocks] == [True, False, False, True]
    assert [block.words_to_sentence is not None for block in model.blocks] == [True, False, False, True]
    assert logits(model).shape == (1, 1000)


@pytest.mark.parametrize("knob, param, size", [("word_pos", "word_pos", 16 * 24),
                                               ("sentence_pos", "sentence_pos", 197 * 384)])
def test_position_embeddings_can_be_switched_off(knob, param, size):
    with_pe, without = create_model("tnt-s", depth=1), create_model("tnt-s", depth=1, **{knob: False})
    assert param not in without.state_dict()
    assert n_params(with_pe) - n_params(without) == size
    assert logits(without).shape == (1, 1000)


@pytest.mark.parametrize("stride, word_dim, inner_heads, words", [(8, 96, 4, 4), (4, 24, 4, 16), (2, 6, 2, 64)])
def test_inner_stride_sets_the_number_of_words_per_patch(stride, word_dim, inner_heads, words):
    model = create_model("tnt-s", depth=1, inner_stride=stride, word_dim=word_dim, inner_heads=inner_heads)
    assert model.cfg.num_words == words
    assert model.word_pos.shape == (1, words, word_dim)
    with torch.no_grad():
        assert model.word_embed(torch.zeros(1, 3, 224, 224)).shape == (196, words, word_dim)
    assert logits(model).shape == (1, 1000)


def test_se_adds_a_gate_to_every_outer_mlp():
    with torch.device("meta"):                                     # shapes only
        plain, se = create_model("tnt-s"), create_model("tnt-s-se")
    assert all(block.outer.se is not None for block in se.blocks)
    assert n_params(se) / 1e6 == pytest.approx(24.67, abs=0.005)
    assert n_params(se) - n_params(plain) == 12 * (2 * 384 + 384 * 96 + 96 + 96 * 384 + 384)  # LN + 2 linears


class OfficialSE(nn.Module):
    """The SE of the official tnt_pytorch/tnt.py: gate = Tanh(Linear(ReLU(Linear(LN(token mean)))))."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim // 4), nn.ReLU(), nn.Linear(dim // 4, dim),
                                nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc(x.mean(dim=1, keepdim=True))


def test_se_block_computes_the_official_outer_block():
    """Official: x += attn(norm1(x)); tmp = mlp(norm2(x)); x += tmp + se_layer(tmp), with se_layer.fc.0/1/3 ours
    se.norm/fc1/fc2 (the names the checkpoint converter maps)."""
    layer = create_model("tnt-s-se", depth=1).blocks[0].outer.eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.1)
    official = OfficialSE(384)
    for index, ours in ((0, layer.se.norm), (1, layer.se.fc1), (3, layer.se.fc2)):
        official.fc[index].load_state_dict(ours.state_dict())
    x = torch.randn(2, 197, 384)
    with torch.no_grad():
        x1 = x + layer.attn(layer.norm1(x))
        tmp = layer.mlp(layer.norm2(x1))
        torch.testing.assert_close(layer(x), x1 + tmp + official(tmp))


def test_img_size_sets_the_sentence_grid():
    model = create_model("tnt-s", depth=1, img_size=384)
    assert model.sentence_pos.shape == (1, 577, 384)
    assert model.word_pos.shape == (1, 16, 24)                     # words per patch do not change
    assert logits(model, img_size=384).shape == (1, 1000)


def test_num_classes_sets_the_head():
    assert create_model("deit-s", depth=1, num_classes=10).head.out_features == 10


# ------------------------------------------------------------------------------------------ stochastic depth
@pytest.mark.parametrize("name", ["tnt-s", "deit-s"])
def test_drop_path_rate_grows_linearly_from_zero_at_the_first_block(name):
    model = create_model(name, depth=5, drop_path_rate=0.2)
    layers = [b.outer for b in model.blocks] if name.startswith("tnt") else list(model.blocks)
    assert [layer.drop_path.rate for layer in layers] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])
    if name.startswith("tnt"):                                    # the inner transformer of a block shares its rate
        assert [b.inner.drop_path.rate for b in model.blocks] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_drop_path_rates_can_be_computed_while_building_on_the_meta_device():
    with torch.device("meta"):
        assert drop_path_rates(0.1, 3) == pytest.approx([0.0, 0.05, 0.1])


def test_drop_path_drops_whole_samples_in_training_and_rescales_the_rest():
    drop = DropPath(0.5).train()
    out = drop(torch.ones(4000, 8))
    assert set(out.unique().tolist()) == {0.0, 2.0}
    assert (out == out[:, :1]).all()                               # a sample is kept or dropped as a whole
    assert out.mean().item() == pytest.approx(1.0, abs=0.1)
    assert torch.equal(drop.eval()(torch.ones(3, 8)), torch.ones(3, 8))


def test_dropout_and_drop_path_are_off_in_eval():
    model = create_model("tnt-s", depth=2, drop_rate=0.3, attn_drop_rate=0.3, drop_path_rate=0.3)
    assert torch.equal(logits(model), logits(model))


# ------------------------------------------------------------------------------------------ registry
def test_registry_names_the_paper_models():
    assert {"tnt-ti", "tnt-s", "tnt-b", "tnt-s-se", "tnt-s-legacy", "deit-ti", "deit-s", "deit-b"} <= set(MODELS)
    assert MODELS["tnt-s"].baseline == "deit-s"


def test_unknown_model_name_lists_the_valid_choices():
    with pytest.raises(TntError, match=r"unknown model 'tnt-xl'; choose one of: tnt-ti, tnt-s, .*deit-b"):
        create_model("tnt-xl")


@pytest.mark.parametrize("overrides, message", [
    (dict(img_size=200), "img_size 200 must be a positive multiple of the patch size 16"),
    (dict(heads=5), "dim 384 is not divisible by 5 heads"),
    (dict(inner_heads=5), "word dim 24 is not divisible by 5 inner heads"),
    (dict(inner_stride=3), "inner stride 3 does not divide the patch size 16"),
    (dict(inner_blocks=(12,)), r"inner blocks \[12\] out of range for depth 12"),
    (dict(wordpos=False), "tnt-s has no option wordpos"),
])
def test_bad_config_is_a_user_error_naming_the_problem(overrides, message):
    with pytest.raises(TntError, match=message):
        model_config("tnt-s", **overrides)
