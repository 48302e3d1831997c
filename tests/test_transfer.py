"""`tnt transfer`: every checkpoint format fine-tunes with a new head and a resized sentence position embedding,
the fine-tuning param groups (freeze, layer decay, backbone lr), the Table 9 results table, and bad input."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import timm
import torch
import yaml
from conftest import make_image_folder
from test_checkpoints import official_from_timm, randomize, save
from test_engine import TINY_ARCH, tiny_config

from tntcli.config import build_config
from tntcli.engine.train import build_scheduler, param_groups, train
from tntcli.errors import TntError
from tntcli.models import create_model, load_pretrained, save_model
from tntcli.models.weights import read_checkpoint, resize_pos_embed, to_ours, unwrap_state_dict
from tntcli.transfer import default_recipe, run_transfer, transfer_config, transfer_table, write_transfer_table


# Runs here finish without drawing curves.png/.svg: the plot is not what these tests are about (conftest.py).
pytestmark = pytest.mark.usefixtures("no_training_curves")


def source_weights(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's weights in our layout, as the engine reads them."""
    return to_ours(unwrap_state_dict(read_checkpoint(path)))[1]


# ------------------------------------------------------------------------------------ loading, as the engine does
CHECKPOINTS = {  # format -> (model name, write a 224px depth-1 checkpoint of 1000 classes into a folder)
    "ours": ("tnt-s", lambda d: save_model(randomize(create_model("tnt-s", depth=1)), "tnt-s", d / "ours.pt")),
    "official": ("tnt-s", lambda d: save({"model": official_from_timm(
        randomize(timm.create_model("tnt_s_patch16_224", pretrained=False, depth=1)))}, d / "tnt_s_81.5.pth.tar")),
    "timm-tnt": ("tnt-s", lambda d: save(randomize(timm.create_model(
        "tnt_s_patch16_224", pretrained=False, depth=1)).state_dict(), d / "timm.pth")),
    "timm-deit": ("deit-s", lambda d: save(randomize(timm.create_model(
        "deit_small_patch16_224", pretrained=False, depth=1)).state_dict(), d / "deit.pth")),
}


@pytest.mark.parametrize("fmt, img_size", [(fmt, 384) for fmt in CHECKPOINTS] + [("ours", 224)])
def test_every_format_loads_with_a_new_head_and_a_resized_sentence_position_embedding(tmp_path, fmt, img_size):
    name, write = CHECKPOINTS[fmt]
    path = write(tmp_path)
    source = source_weights(path)
    model = create_model(name, depth=1, num_classes=7, img_size=img_size)
    fresh_head = model.head.weight.detach().clone()
    load_pretrained(model, path, name=name, reset_head=True)          # the engine's call for model.pretrained
    loaded, pos = model.state_dict(), model.pos_key
    assert torch.equal(loaded["head.weight"], fresh_head) and loaded["head.weight"].shape[0] == 7
    assert torch.equal(loaded[pos], resize_pos_embed(source[pos], img_size // 16))
    assert loaded[pos].shape[1] == (img_size // 16) ** 2 + 1
    assert all(torch.equal(loaded[k], source[k]) for k in loaded if not k.startswith("head.") and k != pos)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, img_size, img_size)).shape == (1, 7)


def test_small_grid_checkpoint_transfers_to_twice_the_resolution(tmp_path):
    """32px -> 64px with 8px patches: a 4x4 sentence grid becomes 8x8, words per patch stay 4x4."""
    arch = dict(TINY_ARCH, inner_stride=2)
    source_model = randomize(create_model("tnt-ti", img_size=32, num_classes=10, **arch))
    path = save_model(source_model, "tnt-ti", tmp_path / "a.pt")
    model = create_model("tnt-ti", img_size=64, num_classes=3, **arch)
    load_pretrained(model, path, name="tnt-ti", reset_head=True)
    source = source_weights(path)
    assert model.sentence_pos.shape == (1, 65, 32)
    assert torch.equal(model.sentence_pos.detach(), resize_pos_embed(source["sentence_pos"], 8))
    assert torch.equal(model.word_pos.detach(), source["word_pos"])
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 3)


# ------------------------------------------------------------------------------------------------ param groups
def group_of(groups, model) -> dict[str, dict]:
    by_id = {id(p): g for g in groups for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters() if id(p) in by_id}


def test_default_groups_are_the_two_weight_decay_groups():
    model = create_model("tnt-s", depth=2)
    groups = param_groups(model, 0.05)
    assert len(groups) == 2 and all("lr" not in g for g in groups)
    where = group_of(groups, model)
    assert len(where) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        no_decay = p.ndim <= 1 or name in ("cls_token", "word_pos", "sentence_pos")
        assert where[name]["weight_decay"] == (0.0 if no_decay else 0.05), name


@pytest.mark.parametrize("name, embeddings", [
    ("tnt-s", ("word_embed.", "word_pos", "sentence_embed.", "cls_token", "sentence_pos")),
    ("deit-s", ("patch_embed.", "cls_token", "pos_embed")),
])
def test_layer_decay_and_backbone_scale_set_each_parameters_lr(name, embeddings):
    model, depth, decay, backbone, lr = create_model(name, depth=3), 3, 0.75, 0.1, 1e-3
    groups = param_groups(model, 0.05, lr=lr, layer_decay=decay, backbone_lr_scale=backbone)
    where = group_of(groups, model)
    assert len(where) == len(list(model.parameters()))
    for n, p in model.named_parameters():
        if n.startswith("head."):
            scale = 1.0
        elif n.startswith("norm."):
            scale = backbone
        elif n.startswith("blocks."):                          # block i: decay^(depth - i)
            scale = backbone * decay ** (depth - int(n.split(".")[1]))
        else:
            assert n.startswith(embeddings), n
            scale = backbone * decay ** (depth + 1)
        assert where[n]["lr"] == pytest.approx(lr * scale), n
        # the no-weight-decay rule still holds inside every lr group
        no_decay = p.ndim <= 1 or n in model.no_weight_decay()
        assert where[n]["weight_decay"] == (0.0 if no_decay else 0.05), n
    assert groups[0]["lr"] == max(g["lr"] for g in groups) == lr   # group 0 is the logged lr


def test_frozen_parameters_get_no_group():
    model = create_model("tnt-s", depth=1)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("head."))
    assert set(group_of(param_groups(model, 0.05, lr=1.0, layer_decay=0.5), model)) == {"head.weight", "head.bias"}


def scheduled_lrs(cfg, group_lrs, steps_per_epoch=10):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in group_lrs]
    opt = torch.optim.AdamW([{"params": [p], "lr": lr} for p, lr in zip(params, group_lrs)], lr=group_lrs[0])
    sched = build_scheduler(opt, cfg, group_lrs[0], steps_per_epoch)
    out = []
    for _ in range(cfg.train.epochs * steps_per_epoch):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def schedule_config():
    return build_config({"data": {"data": "digits"}, "train": {"epochs": 10},
                         "optim": {"warmup_epochs": 2, "cooldown_epochs": 2, "min_lr": 1e-5, "warmup_lr": 1e-6}})


def test_warmup_scales_every_group_in_proportion():
    lrs = scheduled_lrs(schedule_config(), [2.5e-4, 2.5e-5])
    assert all(b == pytest.approx(a * 0.1) for a, b in lrs[:20])


def test_whole_schedule_keeps_each_groups_lr_ratio():
    lrs = scheduled_lrs(schedule_config(), [2.5e-4, 2.5e-5])
    assert all(b == pytest.approx(a * 0.1) for a, b in lrs)


# ------------------------------------------------------------------------------------------------ config
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A tiny TNT trained one epoch on digits (10 classes, 16px): our training checkpoint, optimiser state and all."""
    run = tmp_path_factory.mktemp("pre") / "run"
    train(tiny_config(**{"train.epochs": 1, "train.ema_decay": None}), out=run)
    return run / "last.pt"


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "abc", classes=("a", "b", "c"), per_class=(16, 4))


QUICK = {"train.epochs": 1, "data.batch_size": 16, "data.workers": 0, "train.ema_decay": None,
         "optim.warmup_epochs": 0, "optim.cooldown_epochs": 0, "optim.lr": 0.02}


def test_our_checkpoint_gives_its_model_architecture_and_size(pretrained, three_classes):
    cfg = transfer_config(pretrained, overrides={"data.data": str(three_classes)})
    assert (cfg.model.name, cfg.model.img_size, cfg.model.pretrained) == ("tnt-ti", 16, str(pretrained))
    assert {k: cfg.model.arch[k] for k in ("depth", "dim", "patch_size")} == {"depth": 1, "dim": 32, "patch_size": 8}
    assert transfer_config(pretrained, overrides={"data.data": "digits", "model.img_size": 32}).model.img_size == 32


def test_named_datasets_default_to_their_transfer_recipe(pretrained):
    assert [default_recipe(d) for d in ("cifar10", "CIFAR100", "flowers102", "pets", "digits", "/x")] == \
        ["transfer/cifar10", "transfer/cifar100", "transfer/flowers102", "transfer/pets", "transfer/default",
         "transfer/default"]
    cfg = transfer_config(pretrained, overrides={"data.data": "cifar10"})      # no data is read here
    assert (cfg.train.epochs, cfg.model.img_size, cfg.train.ema_decay) == (64, 384, None)


def test_a_foreign_checkpoint_of_unknown_shape_needs_the_model_name(tmp_path):
    path = CHECKPOINTS["timm-tnt"][1](tmp_path)
    with pytest.raises(TntError, match="cannot tell which model .* pass --model"):
        transfer_config(path, overrides={"data.data": "digits"})
    cfg = transfer_config(path, overrides={"data.data": "digits", "model.name": "tnt-s", "model.arch": {"depth": 1}})
    assert cfg.model.name == "tnt-s"


# ------------------------------------------------------------------------------------------------ end to end
def test_transfer_run_fine_tunes_a_new_head_at_a_new_size_and_is_tabulated(tmp_path, pretrained, three_classes):
    runs = tmp_path / "runs"
    summary = run_transfer(pretrained, overrides={**QUICK, "data.data": str(three_classes), "model.img_size": 32},
                           out=runs / "ft")
    assert (summary["status"], summary["num_classes"], summary["img_size"]) == ("completed", 3, 32)
    weights = torch.load(runs / "ft" / "last.pt", weights_only=False)["model"]
    assert weights["head.weight"].shape == (3, 32) and weights["sentence_pos"].shape == (1, 17, 32)
    assert yaml.safe_load((runs / "ft" / "config.yaml").read_text())["model"]["pretrained"] == str(pretrained)

    train(tiny_config(**{**QUICK, "data.data": str(three_classes), "model.img_size": 32}), out=runs / "scratch")
    written = write_transfer_table(runs, tmp_path / "results")
    assert [p.name for p in written] == ["transfer.csv", "transfer.md"]
    df = pd.read_csv(tmp_path / "results" / "transfer.csv")
    ours = df[df.dataset == "abc"].set_index("init")
    assert ours.loc[f"{pretrained.parent.name}/last.pt", "ours_top1"] == round(summary["final_top1"], 2)
    assert all(len(f"{v}".partition(".")[2]) <= 2 for v in df.ours_top1.dropna())   # percentages: 2 decimals
    assert ours.loc["scratch", "run"] == "scratch"
    assert ours.paper_top1.isna().all() and (ours.paper_note == "the paper's Table 9 has no tnt-ti").all()
    from tntcli.transfer import _paper_gap

    entry = {"img_size": 384, "cifar10": 98.7}
    assert _paper_gap({"model": "tnt-s", "dataset": "cifar10", "img_size": 384, "init": "pre/tnt_s.pth"}, entry) == ""
    assert _paper_gap({"model": "tnt-s", "dataset": "cifar10", "img_size": 384, "init": "scratch"},
                      entry) == "trained from scratch, not fine-tuned"
    assert _paper_gap({"model": "tnt-s", "dataset": "cifar10", "img_size": 224, "init": "x/y"}, entry).startswith("224px")
    paper = df[(df.model == "tnt-s") & (df.dataset == "cifar10")].iloc[0]
    assert (paper.paper_top1, paper.img_size, paper.status) == (98.7, 384, "not run here")
    assert df[(df.model == "deit-b") & (df.dataset == "pets")].paper_top1.isna().all()
    assert "the paper's figures" in (tmp_path / "results" / "transfer.md").read_text()


def test_freeze_backbone_trains_only_the_head(tmp_path, pretrained, three_classes):
    summary = run_transfer(pretrained, overrides={**QUICK, "data.data": str(three_classes),
                                                  "model.freeze_backbone": True}, out=tmp_path / "probe")
    assert summary["params_m"] == pytest.approx((32 * 3 + 3) / 1e6, abs=1e-4)      # trainable: the head only
    before, after = source_weights(pretrained), torch.load(tmp_path / "probe" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(after[k], before[k]) for k in after if not k.startswith("head."))
    assert after["head.weight"].shape == (3, 32)


def test_table_rows_for_paper_entries_without_runs(tmp_path):
    df = transfer_table(tmp_path)                                   # no runs at all: the paper's rows only
    assert len(df) == 18 and (df.status == "not run here").all() and df.ours_top1.isna().all()
    assert df.paper_top1.notna().sum() == 16      # DeiT-B on Pets and iNat-2019: '-' in the paper
    cell = df.set_index(["model", "dataset"]).paper_top1
    assert (cell["tnt-s", "inat2019"], cell["tnt-b", "inat2019"]) == (81.4, 83.2)
    assert (cell["deit-b", "imagenet384"], cell["tnt-s", "imagenet384"], cell["tnt-b", "imagenet384"]) == (83.1, 83.1, 83.9)


# ------------------------------------------------------------------------------------------------ bad input
BAD_INPUT = {  # case -> (arguments given the fixtures, expected message)
    "another architecture": (lambda ckpt, d: ["-c", str(ckpt), "--model", "deit-s", "--data", "digits"],
                             "does not fit deit-s"),
    "one class": (lambda ckpt, d: ["-c", str(ckpt), "--data", str(make_image_folder(d / "one", classes=("only",),
                                                                                     per_class=(2, 1)))],
                  "has 1 class; fine-tuning a classifier needs at least 2"),
    "img_size off the patch grid": (lambda ckpt, d: ["-c", str(ckpt), "--data", "digits", "--img-size", "20"],
                                    "img_size 20 must be a positive multiple of the patch size 8"),
}


def assert_one_line_error(code, stderr, message):
    assert code == 2, stderr
    assert message in stderr and stderr.strip().count("\n") == 0 and "Traceback" not in stderr, stderr


def test_a_missing_checkpoint_is_one_line_and_exit_2_from_the_command_line(tmp_path, tnt_main):
    result = tnt_main("transfer", "-c", str(tmp_path / "missing.pt"), "--data", "digits", cwd=tmp_path)
    assert_one_line_error(result.returncode, result.stderr, "checkpoint not found")


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_refused_in_one_line_before_a_run_folder_is_made(tmp_path, tiny_checkpoint, tnt_main, case):
    """Through the console entry point in-process (tests/test_cli_models.py covers the process exit)."""
    args, message = BAD_INPUT[case]
    result = tnt_main("transfer", *args(tiny_checkpoint, tmp_path), "--out", tmp_path / "never")
    assert_one_line_error(result.returncode, result.stderr, message)
    assert not (tmp_path / "never").exists()
