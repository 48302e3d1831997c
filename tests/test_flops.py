"""Parameter and MAC counts, each checked against a source that does not read our counter:

- params: timm's own models (`timm.create_model`, built on the meta device) where timm has the architecture, and
  always the closed form below (the paper's Eq. 18 per block plus the stem, embeddings, norms and head it leaves out);
- MACs: the paper's Eq. 17 per TNT block, 2nmc(6c + m) + nmcd + 2nd(6d + n), plus what it leaves out (word stem
  conv, sentence embedding, LayerNorms at fvcore's 5 per element, head), computed here in integers; and
  `torch.utils.flop_counter.FlopCounterMode` as a second counter of the same forward.
Every count is compared exactly (integers), and per-module MACs add up exactly to the measured total.
"""
from __future__ import annotations


import pandas as pd
import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from tntcli import flops
from tntcli.errors import TntError
from tntcli.models import create_model
from tntcli.models.registry import model_config
from tntcli.models.tnt import TNTConfig


# ------------------------------------------------------------------------------------------- closed forms
def ln(rows: int, width: int) -> int:
    """fvcore's LayerNorm count: 5 per element (mean, variance, normalise, scale, shift)."""
    return 5 * rows * width


def layer_macs(tokens: int, d: int, seqs: int = 1, se: bool = False) -> int:
    """One pre-norm transformer layer (MLP ratio 4) over `seqs` sequences of `tokens` tokens: Eq. 17's
    2Nd(6d + N) (qkv 3d^2 + proj d^2 + MLP 8d^2 per token, QK^T and AV N^2 d each) plus its two LayerNorms;
    SE: LayerNorm and the two linears (d -> d/4 -> d) on the token mean."""
    macs = 2 * tokens * d * (6 * d + tokens) + 2 * ln(tokens, d)
    if se:
        macs += ln(1, d) + 2 * d * (d // 4)
    return seqs * macs


def tnt_macs(c: TNTConfig) -> int:
    n, m, w, d = c.grid ** 2, c.num_words, c.word_dim, c.dim
    total = n * m * w * c.in_chans * 7 * 7                                  # word stem: 7x7 conv, m outputs/patch
    total += ln(n, m * w) + n * m * w * d + ln(n, d)                        # sentence embedding
    for i in range(c.depth):
        if c.has_inner(i):                                                  # Eq. 17: 2nmc(6c + m) + nmcd
            total += layer_macs(m, w, seqs=n) + ln(n, m * w) + n * m * w * d + ln(n, d)
        total += layer_macs(n + 1, d, se=c.se)                              # Eq. 17: 2nd(6d + n), with cls
    return total + ln(1, d) + d * c.num_classes                             # final norm (cls row) and head


def deit_macs(c) -> int:
    n, d = (c.img_size // c.patch_size) ** 2, c.dim
    return n * d * c.in_chans * c.patch_size ** 2 + c.depth * layer_macs(n + 1, d) + ln(1, d) + d * c.num_classes


def layer_params(d: int, qkv_bias: bool = False, se: bool = False) -> int:
    """Eq. 18's 12d^2 per layer plus biases (proj, fc1, fc2: 6d) and two LayerNorms (4d); SE adds its own."""
    params = 12 * d * d + 10 * d + (3 * d if qkv_bias else 0)
    return params + ((2 * d + 2 * d * (d // 4) + d // 4 + d) if se else 0)


def tnt_params(c: TNTConfig) -> int:
    n, m, w, d = c.grid ** 2, c.num_words, c.word_dim, c.dim
    p = c.in_chans * 49 * w + w + (m * w if c.word_pos else 0)               # stem conv, word position encoding
    p += 2 * m * w + m * w * d + d + 2 * d + d + ((n + 1) * d if c.sentence_pos else 0)   # embed, cls, pos
    for i in range(c.depth):
        if c.has_inner(i):
            p += layer_params(w) + 2 * m * w + m * w * d + 2 * d             # inner layer, words -> sentence
        p += layer_params(d, se=c.se)
    return p + 2 * d + d * c.num_classes + c.num_classes


def deit_params(c) -> int:
    n, d = (c.img_size // c.patch_size) ** 2, c.dim
    return (c.in_chans * c.patch_size ** 2 * d + d + d + (n + 1) * d + c.depth * layer_params(d, qkv_bias=True)
            + 2 * d + d * c.num_classes + c.num_classes)


def closed_form(name: str, **overrides) -> tuple[int, int]:
    c = model_config(name, **overrides)
    return (tnt_params(c), tnt_macs(c)) if isinstance(c, TNTConfig) else (deit_params(c), deit_macs(c))


TIMM_NAMES = {"tnt-s": "tnt_s_patch16_224", "tnt-b": "tnt_b_patch16_224", "deit-ti": "deit_tiny_patch16_224",
              "deit-s": "deit_small_patch16_224", "deit-b": "deit_base_patch16_224"}   # timm has no TNT-Ti/S-SE


# ------------------------------------------------------------------------------------------- params
@pytest.mark.parametrize("name", flops.PAPER_MODELS)
def test_params_equal_timms_model_and_the_closed_form(name):
    with torch.device("meta"):                                   # shapes only: fast for TNT-B and DeiT-B too
        ours = flops.trainable_params(create_model(name))
        theirs = sum(p.numel() for p in timm.create_model(TIMM_NAMES[name]).parameters()) \
            if name in TIMM_NAMES else None
    assert ours == closed_form(name)[0]
    assert theirs is None or ours == theirs


def test_params_count_only_trainable_parameters():
    model = create_model("tnt-ti", depth=1)
    before = flops.trainable_params(model)
    model.word_pos.requires_grad_(False)
    assert before - flops.trainable_params(model) == 16 * 12


# ------------------------------------------------------------------------------------------- MACs
@pytest.mark.parametrize("name", ["tnt-ti", "deit-ti", "tnt-s-se"])
def test_macs_at_224_equal_eq17_plus_the_parts_it_leaves_out(name):
    assert flops.count_macs(create_model(name), 224).total() == closed_form(name)[1]


@pytest.mark.slow
def test_the_all_models_table_equals_the_closed_forms_and_sits_beside_the_paper(paper_flops_table):
    paper_table = paper_flops_table
    assert paper_table.model.tolist() == flops.PAPER_MODELS
    for row in paper_table.itertuples():
        params, macs = closed_form(row.model)
        assert (row.params_m, row.gmacs) == (round(params / 1e6, 3), round(macs / 1e9, 3)), row.model
    assert ((paper_table.gmacs - paper_table.paper_gmacs).abs() <= 0.05).all()    # the paper prints one decimal


@pytest.mark.slow
def test_flops_all_writes_the_measured_table_of_every_paper_model(tmp_path, paper_flops_table, monkeypatch, tnt_main):
    """`tnt flops --all`'s wiring; the table is the one measured once per session (checked above). In this file,
    beside the other user of that table, so that a test process measuring it measures it for both."""
    asked = []
    monkeypatch.setattr(flops, "flops_table", lambda names, img_size: asked.append((names, img_size))
                        or paper_flops_table)
    assert tnt_main("flops", "--all", "--out", str(tmp_path)).returncode == 0
    assert asked == [(flops.PAPER_MODELS, 224)]
    df = pd.read_csv(tmp_path / "flops.csv")
    assert df.model.tolist() == flops.PAPER_MODELS
    pd.testing.assert_frame_equal(df, paper_flops_table, check_exact=True, check_dtype=False)
    assert ((df.gmacs - df.paper_gmacs).abs() <= 0.05).all()          # the paper prints one decimal
    assert (df.params_rel_diff.abs() <= 0.01).all()


def second_count(name: str, img_size: int, **arch) -> int:
    """MACs of the same forward by torch's FlopCounterMode (matmul-type ops, 2 flops per MAC) plus the LayerNorms
    it does not count, at fvcore's 5 per element, from the norms' actual inputs."""
    with torch.device("meta"):
        model = create_model(name, img_size=img_size, **arch).eval()
    norms = []
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.register_forward_hook(lambda m, inp, out: norms.append(inp[0].numel()))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, img_size, img_size, device="meta"))
    assert counter.get_total_flops() % 2 == 0
    return counter.get_total_flops() // 2 + sum(5 * n for n in norms)


TINY = dict(depth=2, dim=48, word_dim=12, heads=2, inner_heads=2)


@pytest.mark.parametrize("name, arch", [("tnt-s", TINY), ("tnt-s", dict(TINY, se=True)),
                                        ("tnt-s", dict(TINY, inner_blocks=(1,), word_pos=False)),
                                        ("deit-s", dict(depth=2, dim=48, heads=2))])
def test_a_second_counter_agrees_exactly_on_tiny_models(name, arch):
    measured = flops.count_macs(create_model(name, img_size=64, **arch), 64).total()
    assert measured == second_count(name, 64, **arch) == closed_form(name, img_size=64, **arch)[1]


@pytest.mark.parametrize("name", ["tnt-ti", "deit-ti"])
def test_per_module_macs_add_up_exactly_to_the_total(name):
    analysis = flops.count_macs(create_model(name, depth=3), 224)
    counts = analysis.by_module()
    total = analysis.total()
    for i in range(3):
        children = [m for m in counts if m.startswith(f"blocks.{i}.") and m.count(".") == 2]
        assert children and sum(counts[m] for m in children) == counts[f"blocks.{i}"]
    top = [m for m in counts if m and "." not in m]
    assert counts["head"] == 192 * 1000                       # the classifier: d x classes
    assert sum(counts[m] for m in top) == total


def test_gmacs_by_module_add_up_to_the_total():
    parts = flops.by_module("tnt-ti")
    assert {"word_embed", "sentence_embed", "blocks.*.inner", "blocks.*.words_to_sentence", "blocks.*.outer",
            "norm", "head"} <= set(parts)
    assert max(parts, key=parts.get) == "blocks.*.outer"
    assert sum(parts.values()) == pytest.approx(closed_form("tnt-ti")[1] / 1e9, rel=1e-12)


# ------------------------------------------------------------------------------------------- the table
def test_table_sets_ours_beside_the_paper_and_the_deit_baseline():
    row = flops.flops_table(["tnt-ti"]).iloc[0]
    params, macs = closed_form("tnt-ti")
    assert (row.model, row.img_size, row.params_m, row.gmacs) == ("tnt-ti", 224, round(params / 1e6, 3),
                                                                  round(macs / 1e9, 3))
    assert (row.paper_params_m, row.paper_gmacs) == (6.1, 1.4)                  # paper Table 4, as printed
    assert row.gmacs_rel_diff == round((macs / 1e9 - 1.4) / 1.4, 4)
    assert row.baseline == "deit-ti" and row.baseline_gmacs == round(closed_form("deit-ti")[1] / 1e9, 3)
    assert row.gmacs_vs_baseline == round(macs / closed_form("deit-ti")[1], 3)


def test_table_at_another_resolution_has_no_paper_figures():
    row = flops.flops_table(["deit-ti"], img_size=384).iloc[0]
    assert row.img_size == 384 and row.gmacs == round(closed_form("deit-ti", img_size=384)[1] / 1e9, 3)
    assert pd.isna(row.paper_params_m) and pd.isna(row.paper_gmacs) and pd.isna(row.gmacs_rel_diff)


def test_deit_rows_have_no_baseline():
    row = flops.flops_table(["deit-ti"]).iloc[0]
    assert pd.isna(row.baseline) and pd.isna(row.baseline_gmacs) and pd.isna(row.gmacs_vs_baseline)


@pytest.mark.parametrize("names, all_models, expected", [
    (["tnt-s", "deit-s", "tnt-s"], False, ["tnt-s", "deit-s"]),
    ([], True, ["tnt-ti", "tnt-s", "tnt-b", "tnt-s-se", "deit-ti", "deit-s", "deit-b"]),
])
def test_model_names_are_deduplicated_and_all_means_the_paper_models(names, all_models, expected):
    assert flops.resolve_names(names, all_models) == expected


@pytest.mark.parametrize("names, message", [([], "name a model with --model"), (["tnt-xl"], "unknown model 'tnt-xl'")])
def test_missing_or_unknown_model_names_are_user_errors(names, message):
    with pytest.raises(TntError, match=message):
        flops.resolve_names(names, False)
