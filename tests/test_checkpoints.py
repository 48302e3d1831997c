"""Checkpoint interoperability: every supported layout loads with the same logits as its source implementation.

timm is the reference (test-only dependency; models are built with random weights, nothing is downloaded). The
official TNT release has no importable package, so its layout is made from a timm state dict by undoing timm's own
`checkpoint_filter_fn`; a test checks that the filter maps it back exactly.
"""
import argparse
import random

import pytest
import timm
import torch
from timm.models.tnt import checkpoint_filter_fn
from torch import nn

from tntcli.errors import TntError
from tntcli.models import create_model, load_checkpoint, save_model
from tntcli.models.weights import detect_format, export_timm, model_record, resize_pos_embed

TOL = 1e-5                                         # max abs logit difference, fp32
X = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random, LayerNorms and biases included, so a misplaced tensor changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def run(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def assert_same_logits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= TOL


def save(obj, path):
    torch.save(obj, path)
    return path


# ------------------------------------------------------------------------------- official TNT layout, made two ways
# Inverse of the renames in timm's checkpoint_filter_fn (official -> timm), applied per key component.
TIMM_TO_OFFICIAL = {
    "patch_pos": "outer_pos", "pixel_pos": "inner_pos", "pixel_embed": "patch_embed",
    "norm1_proj": "proj_norm1", "norm2_proj": "proj_norm2",
    "norm_in": "inner_norm1", "attn_in": "inner_attn", "norm_mlp_in": "inner_norm2", "mlp_in": "inner_mlp",
    "norm_out": "outer_norm1", "attn_out": "outer_attn", "norm_mlp": "outer_norm2", "mlp": "outer_mlp",
}


def official_from_timm(timm_tnt: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in timm_tnt.state_dict().items():
        key = ".".join(TIMM_TO_OFFICIAL.get(part, part) for part in key.split("."))
        if key == "inner_pos":                       # timm (1, c, 4, 4) -> official (1, 16, c)
            value = value.flatten(2).transpose(1, 2)
        out[key] = value.clone()
    out["outer_tokens"] = torch.zeros(1, 196, timm_tnt.embed_dim)   # the official code's unused zero parameter
    return out


# Our module names -> the official tnt_pytorch/tnt.py names (SE included: se_layer.fc = LN, Linear, ReLU, Linear, Tanh).
OURS_TO_OFFICIAL = {
    "word_embed.proj": "patch_embed.proj", "word_pos": "inner_pos", "sentence_pos": "outer_pos",
    "sentence_embed.norm_in": "proj_norm1", "sentence_embed.proj": "proj", "sentence_embed.norm_out": "proj_norm2",
    "inner.norm1": "inner_norm1", "inner.attn": "inner_attn", "inner.norm2": "inner_norm2", "inner.mlp": "inner_mlp",
    "words_to_sentence.norm_in": "proj_norm1", "words_to_sentence.proj": "proj",
    "words_to_sentence.norm_out": "proj_norm2",
    "outer.norm1": "outer_norm1", "outer.attn": "outer_attn", "outer.norm2": "outer_norm2", "outer.mlp": "outer_mlp",
    "outer.se.norm": "se_layer.fc.0", "outer.se.fc1": "se_layer.fc.1", "outer.se.fc2": "se_layer.fc.3",
}


def official_from_ours(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        prefix, rest = (".".join(parts[:2]) + ".", ".".join(parts[2:])) if parts[0] == "blocks" else ("", key)
        for ours in sorted(OURS_TO_OFFICIAL, key=len, reverse=True):
            if rest == ours or rest.startswith(ours + "."):
                rest = OURS_TO_OFFICIAL[ours] + rest[len(ours):]
                break
        key = prefix + rest
        if ".attn.qkv." in key:                      # official attention keeps qk and v apart
            d = value.shape[0] // 3
            out[key.replace(".qkv.", ".qk.")], out[key.replace(".qkv.", ".v.")] = value[:2 * d], value[2 * d:]
        else:
            out[key] = value.clone()
    return out


@pytest.fixture(scope="module")
def timm_tnt_s():
    """A 2-block timm TNT-S with random weights, and its logits."""
    model = randomize(timm.create_model("tnt_s_patch16_224", pretrained=False, depth=2))
    return model, run(model)


def test_official_layout_is_what_timms_own_filter_converts_back_exactly(timm_tnt_s):
    model, _ = timm_tnt_s
    official = official_from_timm(model)
    assert official["inner_pos"].shape == (1, 16, 24) and "blocks.1.inner_attn.qk.weight" in official
    back = checkpoint_filter_fn(dict(official), model)
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "state_dict_ema", "ddp prefix", "with args"])
def test_official_release_loads_with_timm_logits(tmp_path, timm_tnt_s, wrap):
    model, expected = timm_tnt_s
    sd = official_from_timm(model)
    obj = {"plain": sd, "model": {"model": sd}, "state_dict": {"state_dict": sd},
           "state_dict_ema": {"state_dict_ema": sd},
           "ddp prefix": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
           "with args": {"state_dict": sd, "args": argparse.Namespace(lr=5e-4), "epoch": 299}}[wrap]
    ours, name = load_checkpoint(save(obj, tmp_path / "tnt_s_81.5.pth.tar"), "tnt-s", depth=2)
    assert name == "tnt-s"
    assert_same_logits(run(ours), expected)


def test_ema_weights_are_read_only_when_asked_for(tmp_path):
    main, ema = (randomize(timm.create_model("tnt_s_patch16_224", depth=1), seed=s) for s in (1, 2))
    path = save({"state_dict": official_from_timm(main), "state_dict_ema": official_from_timm(ema)}, tmp_path / "c.pt")
    assert_same_logits(run(load_checkpoint(path, "tnt-s", depth=1)[0]), run(main))
    assert_same_logits(run(load_checkpoint(path, "tnt-s", depth=1, ema=True)[0]), run(ema))


def test_official_se_checkpoint_loads_with_equal_logits(tmp_path):
    ours = randomize(create_model("tnt-s-se", depth=2))
    official = official_from_ours(ours)
    assert {"blocks.1.se_layer.fc.0.weight", "blocks.1.se_layer.fc.1.weight", "blocks.1.se_layer.fc.3.weight"} <= \
        set(official)
    official["outer_tokens"] = torch.zeros(1, 196, 384)
    loaded, _ = load_checkpoint(save({"model": official}, tmp_path / "tnt_s_se.pth"), "tnt-s-se", depth=2)
    assert_same_logits(run(loaded), run(ours))


# ------------------------------------------------------------------------------------------------ timm layouts
TIMM_CASES = [  # timm name, ours, detected format
    ("tnt_s_patch16_224", "tnt-s", "timm-tnt"),
    ("tnt_b_patch16_224", "tnt-b", "timm-tnt"),
    ("tnt_s_legacy_patch16_224", "tnt-s-legacy", "timm-tnt-legacy"),
    ("deit_small_patch16_224", "deit-s", "deit"),
]


@pytest.mark.parametrize("timm_name, name, fmt", TIMM_CASES)
def test_timm_weights_load_with_timm_logits(tmp_path, timm_name, name, fmt):
    reference = randomize(timm.create_model(timm_name, pretrained=False, depth=2))
    assert detect_format(reference.state_dict()) == fmt
    ours, _ = load_checkpoint(save(reference.state_dict(), tmp_path / "timm.pth"), name, depth=2)
    assert_same_logits(run(ours), run(reference))


@pytest.mark.parametrize("timm_name, name, fmt", TIMM_CASES)
def test_our_weights_export_into_timm_with_equal_logits(timm_name, name, fmt):
    ours = randomize(create_model(name, depth=2))
    reference = timm.create_model(timm_name, pretrained=False, depth=2)
    reference.load_state_dict(export_timm(ours))                  # strict: every key and shape must match
    assert_same_logits(run(reference), run(ours))


@pytest.mark.slow
@pytest.mark.parametrize("timm_name, name", [("tnt_s_patch16_224", "tnt-s"), ("tnt_b_patch16_224", "tnt-b")])
def test_full_depth_timm_weights_load_with_timm_logits(tmp_path, timm_name, name):
    reference = randomize(timm.create_model(timm_name, pretrained=False))
    ours, _ = load_checkpoint(save(reference.state_dict(), tmp_path / "timm.pth"), name)
    assert_same_logits(run(ours), run(reference))


def test_se_models_have_no_timm_layout_to_export_to():
    with pytest.raises(KeyError, match="no timm equivalent"):
        export_timm(create_model("tnt-s-se", depth=1))


def test_distilled_deit_is_refused_by_name(tmp_path):
    distilled = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=1)
    with pytest.raises(TntError, match="distilled DeiT checkpoints are not supported"):
        load_checkpoint(save(distilled.state_dict(), tmp_path / "d.pth"), "deit-ti", depth=1)


def test_model_name_is_guessed_from_the_shapes_of_a_foreign_checkpoint(tmp_path):
    path = save(timm.create_model("deit_tiny_patch16_224", pretrained=False).state_dict(), tmp_path / "deit.pth")
    assert load_checkpoint(path)[1] == "deit-ti"


# ------------------------------------------------------------------------------------------------ our own files
@pytest.mark.parametrize("name, overrides", [
    ("tnt-s", dict(depth=2, inner_blocks=(1,), sentence_pos=False, num_classes=7)),
    ("deit-ti", dict(depth=1, num_classes=7)),
])
def test_own_file_rebuilds_the_saved_model_without_flags(tmp_path, name, overrides):
    model = randomize(create_model(name, **overrides))
    loaded, loaded_name = load_checkpoint(save_model(model, name, tmp_path / "ckpt.pt"))
    assert loaded_name == name and loaded.cfg == model.cfg
    assert_same_logits(run(loaded), run(model))


def test_save_model_leaves_only_the_finished_file(tmp_path):
    save_model(create_model("deit-ti", depth=1), "deit-ti", tmp_path / "ckpt.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_own_file_ema_weights_are_read_only_when_asked_for(tmp_path):
    model, ema = randomize(create_model("deit-ti", depth=1), 1), randomize(create_model("deit-ti", depth=1), 2)
    path = tmp_path / "ckpt.pt"
    torch.save(model_record(model, "deit-ti", ema=ema), path)
    assert_same_logits(run(load_checkpoint(path)[0]), run(model))
    assert_same_logits(run(load_checkpoint(path, ema=True)[0]), run(ema))


@pytest.mark.parametrize("kind", ["ours", "official"])
def test_asking_for_ema_weights_that_are_not_there_is_an_error(tmp_path, timm_tnt_s, kind):
    path = tmp_path / "ckpt.pt"
    if kind == "ours":
        save_model(create_model("tnt-s", depth=2), "tnt-s", path)
    else:
        save({"model": official_from_timm(timm_tnt_s[0])}, path)
    with pytest.raises(TntError, match="no EMA weights"):
        load_checkpoint(path, "tnt-s" if kind == "official" else None, depth=2, ema=True)


# ------------------------------------------------------------------------------------------------ new head
def test_num_classes_gives_a_fresh_head_and_keeps_every_other_weight(tmp_path, timm_tnt_s):
    path = save(timm_tnt_s[0].state_dict(), tmp_path / "timm.pth")
    source = load_checkpoint(path, "tnt-s", depth=2)[0].state_dict()
    model, _ = load_checkpoint(path, "tnt-s", depth=2, num_classes=10)
    sd = model.state_dict()
    assert sd["head.weight"].shape == (10, 384) and torch.equal(sd["head.bias"], torch.zeros(10))
    assert sd.keys() == source.keys()
    assert all(torch.equal(sd[k], source[k]) for k in sd if not k.startswith("head."))


def test_a_head_of_another_size_is_refused_without_num_classes(tmp_path):
    path = save_model(create_model("tnt-s", depth=2, num_classes=10), "tnt-s", tmp_path / "ft.pt")
    with pytest.raises(TntError, match="its head has 10 classes"):
        load_checkpoint(path, "tnt-s", depth=2)


# ------------------------------------------------------------------------------------------ position embeddings
def test_resizing_to_the_same_grid_is_the_identity():
    pos = torch.randn(1, 197, 8)
    assert torch.equal(resize_pos_embed(pos, 14), pos)


def test_resizing_keeps_the_cls_entry_and_the_grid_orientation():
    rows = torch.arange(14.0).repeat_interleave(14)               # value = row of the patch, same along a row
    pos = torch.cat([torch.full((1, 1, 2), -7.0), rows.view(1, 196, 1).expand(1, 196, 2)], dim=1)
    out = resize_pos_embed(pos, 24)
    assert out.shape == (1, 577, 2)
    assert torch.equal(out[:, 0], pos[:, 0])
    grid = out[0, 1:, 0].view(24, 24)
    assert torch.allclose(grid, grid[:, :1].expand(24, 24))       # still constant along each row
    assert (grid[1:, 0] >= grid[:-1, 0]).all() and grid[-1, 0] > grid[0, 0]


def test_a_position_embedding_that_is_not_a_square_grid_is_refused():
    with pytest.raises(TntError, match="not a square grid"):
        resize_pos_embed(torch.zeros(1, 1 + 10, 4), 4)


@pytest.mark.parametrize("name", ["tnt-s", "deit-s"])
def test_224_checkpoint_loads_at_384_with_a_resized_sentence_position_embedding(tmp_path, name):
    model = randomize(create_model(name, depth=1))
    loaded, _ = load_checkpoint(save_model(model, name, tmp_path / "ckpt.pt"), img_size=384)
    old, new = model.state_dict(), loaded.state_dict()
    pos = model.pos_key
    assert new[pos].shape == (1, 577, model.cfg.dim)
    assert torch.equal(new[pos][:, 0], old[pos][:, 0])
    assert all(torch.equal(new[k], old[k]) for k in old if k != pos)   # word_pos and all weights unchanged
    assert run(loaded, torch.randn(1, 3, 384, 384)).shape == (1, 1000)


def test_small_grid_checkpoint_loads_at_twice_the_resolution(tmp_path):
    model = create_model("tnt-s", depth=1, img_size=32, patch_size=8)  # 4x4 patches of 2x2 words
    loaded, _ = load_checkpoint(save_model(model, "tnt-s", tmp_path / "ckpt.pt"), img_size=64)
    assert loaded.sentence_pos.shape == (1, 65, 384)
    assert torch.equal(loaded.word_pos, model.word_pos)
    assert run(loaded, torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_official_224_checkpoint_loads_at_384(tmp_path, timm_tnt_s):
    path = save({"model": official_from_timm(timm_tnt_s[0])}, tmp_path / "official.pth")
    model, _ = load_checkpoint(path, "tnt-s", depth=2, img_size=384)
    assert model.sentence_pos.shape == (1, 577, 384)


# ------------------------------------------------------------------------------------------------ bad input
def write_bytes(folder, data: bytes):
    (folder / "x.pt").write_bytes(data)
    return folder / "x.pt"


BAD_FILES = {  # name -> (make the file in a folder, expected message)
    "missing": (lambda d: d / "nope.pt", "checkpoint not found"),
    "a folder": (lambda d: d, "checkpoint not found"),
    "random bytes": (lambda d: write_bytes(d, random.Random(0).randbytes(4096)), "cannot read checkpoint"),
    "empty": (lambda d: write_bytes(d, b""), "cannot read checkpoint"),
    "a list": (lambda d: save([1, 2], d / "x.pt"), "holds a list, not a state dict"),
    "no tensors": (lambda d: save({"epoch": 3}, d / "x.pt"), "holds no tensors"),
    "another network": (lambda d: save({"encoder.weight": torch.zeros(2)}, d / "x.pt"),
                        "unrecognised checkpoint layout"),
}


@pytest.mark.parametrize("kind", BAD_FILES)
def test_a_file_that_is_not_a_usable_checkpoint_is_a_one_line_user_error(tmp_path, kind):
    make, message = BAD_FILES[kind]
    with pytest.raises(TntError, match=message) as err:
        load_checkpoint(make(tmp_path), "tnt-s")
    assert "\n" not in str(err.value)


def test_weights_of_another_model_name_the_model_they_look_like(tmp_path):
    with torch.device("meta"):
        shapes = create_model("tnt-b").state_dict()
    path = save({k: torch.zeros(v.shape) for k, v in shapes.items()}, tmp_path / "tnt_b.pth")
    with pytest.raises(TntError, match=r"does not fit tnt-s: .*dim 640.*\(it looks like tnt-b\)"):
        load_checkpoint(path, "tnt-s")


def test_missing_keys_are_named(tmp_path):
    sd = create_model("tnt-s", depth=2).state_dict()
    del sd["norm.weight"]
    with pytest.raises(TntError, match=r"missing \['norm.weight'\]"):
        load_checkpoint(save(sd, tmp_path / "x.pt"), "tnt-s", depth=2)


def test_foreign_weights_of_no_registered_shape_need_a_model_name(tmp_path, timm_tnt_s):
    with pytest.raises(TntError, match="cannot tell which model .* pass --model"):
        load_checkpoint(save(timm_tnt_s[0].state_dict(), tmp_path / "x.pt"))


@pytest.mark.parametrize("name, overrides, message", [
    ("tnt-xl", {}, "unknown model 'tnt-xl'; choose one of: tnt-ti, tnt-s"),
    ("tnt-s", dict(img_size=200), "img_size 200 must be a positive multiple of the patch size 16"),
    ("tnt-s", dict(heads=5), "dim 384 is not divisible by 5 heads"),
    (None, dict(img_size=200), "img_size 200 must be a positive multiple of the patch size 16"),
    (None, dict(heads=5), "dim 384 is not divisible by 5 heads"),
    (None, dict(wordpos=False), "tnt-s has no option wordpos"),
], ids=["unknown name", "img size", "heads", "own file img size", "own file heads", "own file unknown option"])
def test_bad_model_options_are_user_errors_for_named_and_own_files(tmp_path, name, overrides, message):
    path = save_model(create_model("tnt-s", depth=2), "tnt-s", tmp_path / "ckpt.pt")
    if name is not None:
        overrides = dict(overrides, depth=2)
    with pytest.raises(TntError, match=message):
        load_checkpoint(path, name, **overrides)
