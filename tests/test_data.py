"""Data layer, torchvision path and sources: tiny generated images only (never ../shared)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tntcli.data import AugmentSettings, build_loaders, resolve_source
from tntcli.data.augment import BatchAugment, parse_rand_augment
from tntcli.data.pipelines import RASampler
from tntcli.errors import TntError, TntWarning

FULL = AugmentSettings()  # the TNT/DeiT recipe: RRC, flip, RandAugment, erasing, MixUp/CutMix


def loaders(data, **kw):
    settings = dict(img_size=16, batch_size=4, workers=0, aug=FULL)
    settings.update(kw)
    return build_loaders(str(data), **settings)


# -------------------------------------------------------------------------------------------- batches
def test_train_batches_are_normalised_tensors_with_full_augmentation(image_folder):
    lds = loaders(image_folder)
    images, labels = next(iter(lds.train))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.shape == (4,)
    assert images.abs().max() < 10  # normalised ([-1, 1] plus RandomErasing's unit-normal noise)
    mixed, targets = lds.batch_augment(images, labels)
    assert mixed.shape == images.shape and targets.shape == (4, 3)
    assert torch.allclose(targets.sum(1), torch.ones(4))
    assert (lds.n_train, lds.n_val, lds.num_classes, lds.classes) == (24, 9, 3, ["cat", "dog", "emu"])
    assert len(lds.train) == 6  # drop_last
    lds.close()


def test_val_keeps_the_last_batch_and_has_no_augmentation(image_folder):
    lds = loaders(image_folder, batch_size=4)
    batches = list(lds.val)
    assert [len(b[0]) for b in batches] == [4, 4, 1]
    assert torch.cat([b[1] for b in batches]).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    again = list(lds.val)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    # plain [0,1] -> mean 0.5 / std 0.5 normalisation keeps values in [-1, 1]
    assert all(b[0].min() >= -1 - 1e-6 and b[0].max() <= 1 + 1e-6 for b in batches)


def test_no_augmentation_passes_labels_through(image_folder):
    lds = loaders(image_folder, aug=None)
    images, labels = next(iter(lds.train))
    out, targets = lds.batch_augment(images, labels)
    assert out is images and targets is labels
    off = BatchAugment(AugmentSettings(mixup=0, cutmix=0), 3)
    assert off(images, labels)[1] is labels


def test_set_epoch_makes_batches_a_function_of_seed_and_epoch(image_folder):
    lds = loaders(image_folder)
    first = next(iter(lds.train))
    lds.set_epoch(0)
    again = next(iter(lds.train))
    lds.set_epoch(1)
    other = next(iter(lds.train))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    rng = torch.get_rng_state()
    lds.set_epoch(1)
    mixed_a = lds.batch_augment(*other)
    lds.set_epoch(1)
    mixed_b = lds.batch_augment(*other)
    assert torch.equal(mixed_a[0], mixed_b[0]) and torch.equal(mixed_a[1], mixed_b[1])
    assert torch.equal(rng, torch.get_rng_state())  # the engine's global RNG is left alone


def test_batches_do_not_depend_on_the_number_of_workers(image_folder):
    with_workers = loaders(image_folder, workers=2)
    in_process = loaders(image_folder, workers=0)
    with_workers.set_epoch(3)
    in_process.set_epoch(3)
    a, b = next(iter(with_workers.train)), next(iter(in_process.train))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with_workers.close()


def test_early_stop_with_max_steps(image_folder):
    lds = loaders(image_folder, workers=2)
    assert len(list(lds.train.epoch(max_steps=2))) == 2
    lds.close()
    lds.close()  # idempotent


def test_a_resumed_epoch_skips_to_the_same_batches_a_whole_epoch_gives(image_folder):
    lds = loaders(image_folder, workers=0)
    lds.set_epoch(1)
    whole = list(lds.train.epoch(max_steps=4))
    resumed = list(lds.train.epoch(max_steps=4, skip=2))
    assert len(resumed) == 2
    for (x, y), (rx, ry) in zip(whole[2:], resumed):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_max_train_images_keeps_several_classes(image_folder):
    lds = loaders(image_folder, max_train_images=9, batch_size=3)
    labels = torch.cat([y for _, y in lds.train])
    assert lds.n_train == 9 and len(labels) == 9 and len(labels.unique()) > 1


# ---------------------------------------------------------------------------------------------- digits
def test_digits_is_an_offline_stratified_rgb_split():
    source = resolve_source("digits")
    assert (len(source.train), len(source.val), source.classes) == (1437, 360, [str(i) for i in range(10)])
    img, label = source.val[0]
    assert img.mode == "RGB" and img.size == (8, 8) and 0 <= label < 10
    assert np.asarray(img).max() <= 255
    counts = np.bincount(source.val.targets, minlength=10)
    assert counts.min() >= 35  # stratified: every digit ~36 times in val
    assert resolve_source("digits").val.targets == source.val.targets  # fixed split seed


def test_digits_quickstart_settings_work_at_32px():
    lds = build_loaders("digits", img_size=32, batch_size=64, workers=0, aug=FULL)
    images, labels = next(iter(lds.train))
    assert images.shape == (64, 3, 32, 32)
    assert lds.batch_augment(images, labels)[1].shape == (64, 10)


# ----------------------------------------------------------------------------------------- RASampler
def test_ra_sampler_covers_the_dataset_three_times_across_ranks():
    n, world = 10, 4
    shards = [list(RASampler(n, world, rank, repeats=3, seed=1, truncate=False)) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1  # same length on every rank
    counts = np.bincount(np.concatenate(shards), minlength=n)
    assert set(range(n)) <= set(np.concatenate(shards).tolist())
    assert counts.min() >= 3 and counts.sum() - 3 * n < world  # x3, plus padding to an even split


def test_ra_sampler_puts_the_copies_on_different_ranks_and_keeps_epoch_length():
    shards = [list(RASampler(12, 3, rank, repeats=3, seed=0, truncate=False)) for rank in range(3)]
    assert all(sorted(s) == list(range(12)) for s in shards)  # world == repeats: each rank sees all once
    deit = RASampler(12, 3, 0, repeats=3)
    assert len(list(deit)) == len(deit) == 4
    deit.set_epoch(1)
    assert list(deit) != list(RASampler(12, 3, 0, repeats=3))


def test_repeated_aug_loader(image_folder):
    lds = loaders(image_folder, repeated_aug=3, batch_size=2)
    assert len(lds.train) == 12


# -------------------------------------------------------------------------------------------- sources
def test_missing_path(tmp_path):
    with pytest.raises(TntError, match="no such file or folder"):
        resolve_source(str(tmp_path / "nope"))


def test_empty_folder(tmp_path):
    with pytest.raises(TntError, match="empty folder"):
        resolve_source(str(tmp_path))


def test_folder_without_splits(tmp_path):
    (tmp_path / "cat").mkdir()
    with pytest.raises(TntError, match="no train/ or val/"):
        resolve_source(str(tmp_path))


def test_empty_class_folder(image_folder):
    (image_folder / "train" / "fox").mkdir()
    (image_folder / "val" / "fox").mkdir()
    with pytest.raises(TntError, match=r"class folder .*train/fox is empty"):
        resolve_source(str(image_folder))


def test_different_class_lists(image_folder):
    (image_folder / "val" / "emu").rename(image_folder / "val" / "owl")
    with pytest.raises(TntError, match=r"only in train: \['emu'\]; only in val: \['owl'\]"):
        resolve_source(str(image_folder))


def _add_bad_files(folder: Path) -> None:
    (folder / "train" / "cat" / "notes.jpg").write_text("not an image")
    good = (folder / "train" / "dog" / "0.jpg").read_bytes()
    (folder / "train" / "dog" / "cut.jpg").write_bytes(good[: len(good) // 2])


def test_unreadable_files_are_skipped_with_a_warning_naming_them(image_folder):
    _add_bad_files(image_folder)
    with pytest.warns(TntWarning, match=r"left out 2 unreadable file\(s\)") as caught:
        source = resolve_source(str(image_folder))
    message = str(caught[0].message)
    assert "notes.jpg" in message and "cut.jpg" in message and "--strict" in message
    assert len(source.train) == 24 and len(source.skipped) == 2


def test_unreadable_files_are_an_error_under_strict(image_folder):
    _add_bad_files(image_folder)
    with pytest.raises(TntError, match="2 unreadable image file"):
        resolve_source(str(image_folder), strict=True)


def test_class_with_only_unreadable_files(image_folder):
    for p in (image_folder / "val" / "emu").iterdir():
        p.write_text("broken")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TntError, match="has no readable image"):
            resolve_source(str(image_folder))


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16", "LA"])
def test_any_image_mode_is_read_as_rgb(image_folder, mode):
    path = image_folder / "train" / "cat" / f"odd.{'tif' if mode in ('CMYK',) else 'png'}"
    if mode == "I;16":
        Image.fromarray(np.full((6, 5), 65535, dtype=np.uint16)).save(path)
    else:
        Image.new("RGB", (5, 6), (200, 200, 200)).convert(mode).save(path)
    source = resolve_source(str(image_folder))
    img, _ = next(source.train[i] for i, (p, _) in enumerate(source.train.samples) if p == str(path))
    assert img.mode == "RGB" and img.size == (5, 6)
    assert np.asarray(img).min() > 150  # bright stays bright: 16-bit is rescaled, not clipped to 255/65535


def test_named_dataset_download_failure_names_the_path(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(*args, **kwargs):
        raise RuntimeError("Dataset not found" if not kwargs.get("download") else "network is unreachable")

    monkeypatch.setattr(tvd, "CIFAR10", offline)
    with pytest.raises(TntError, match=rf"cifar10 is not at {tmp_path}/cifar-10-batches-py .*network is unreachable"):
        resolve_source("cifar10", str(tmp_path))
    root = tmp_path / "data" / "nested"                       # a --data-root that did not exist
    with pytest.raises(TntError, match="could not be downloaded"):
        resolve_source("cifar10", str(root))
    assert list(tmp_path.iterdir()) == []                     # no empty ./data left behind


def test_skipped_images_print_as_one_warning_line_in_the_cli(image_folder):
    import io
    import warnings

    from rich.console import Console

    from tntcli.cli import _print_tnt_warnings

    _add_bad_files(image_folder)
    out = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        _print_tnt_warnings(Console(file=out, width=400, color_system=None))
        resolve_source(str(image_folder))
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: left out 2 unreadable file(s)")
    assert "--strict" in lines[0] and "notes.jpg" in lines[0] and "cut.jpg" in lines[0]
    assert "UserWarning" not in lines[0] and "warnings.warn" not in lines[0] and ".py:" not in lines[0]


def test_beton_without_ffcv_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr("tntcli.data.beton.ffcv_available", lambda: False)
    with pytest.raises(TntError, match="make ffcv"):
        resolve_source(str(tmp_path / "x.beton"))


def test_rand_augment_strings():
    spec = parse_rand_augment("rand-m9-mstd0.5-inc1")
    assert (spec.magnitude, spec.num_ops, spec.magnitude_std) == (9, 2, 0.5)
    assert parse_rand_augment("rand-m7-n3").num_ops == 3
    assert parse_rand_augment("") is None and parse_rand_augment(None) is None
    with pytest.raises(TntError, match="rand_augment"):
        parse_rand_augment("auto-m9")
    with pytest.raises(TntError, match="cannot read"):
        parse_rand_augment("rand-x9")


def test_cli_reports_a_bad_source_in_one_line(tmp_path, monkeypatch, capsys):
    from tntcli import cli

    monkeypatch.setattr(sys, "argv", ["tnt", "data", "write", str(tmp_path / "missing"), str(tmp_path / "o.beton")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no such file or folder" in err and "Traceback" not in err


def test_eval_only_reads_val_and_leaves_train_files_unchecked(image_folder):
    (image_folder / "train" / "cat" / "0.jpg").write_bytes(b"not a jpeg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # no warning: train/ was not scanned
        source = resolve_source(str(image_folder), eval_only=True)
    assert source.train is source.val and source.classes == ["cat", "dog", "emu"]
    with pytest.warns(TntWarning, match="0.jpg"):
        resolve_source(str(image_folder))


def test_eval_data_may_be_a_val_folder_alone_or_a_class_root(image_folder):
    import shutil

    shutil.rmtree(image_folder / "train")
    for data in (image_folder, image_folder / "val"):          # root with only val/, or a class-folder root
        lds = build_loaders(str(data), img_size=16, batch_size=4, workers=0, aug=None, eval_only=True)
        assert lds.classes == ["cat", "dog", "emu"] and lds.n_val == 9
        assert torch.cat([y for _, y in lds.val]).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(TntError, match="no train/"):
        resolve_source(str(image_folder))                      # training still needs both splits


def test_eval_data_with_train_but_no_val_names_what_is_missing(image_folder):
    import shutil

    shutil.rmtree(image_folder / "val")
    with pytest.raises(TntError, match="no val/"):
        resolve_source(str(image_folder), eval_only=True)


def test_large_folder_scans_are_cached_by_listing(image_folder, tmp_path, monkeypatch):
    import tntcli.data.sources as sources

    monkeypatch.setattr(sources, "MANIFEST_MIN_FILES", 1)            # real threshold: 5,000 files
    monkeypatch.setenv("TNT_CACHE_DIR", str(tmp_path / "cache"))
    _add_bad_files(image_folder)
    with pytest.warns(TntWarning):
        first = resolve_source(str(image_folder))
    assert len(list((tmp_path / "cache" / "folder-scans").iterdir())) == 2   # train/ and val/

    def no_checks(path):
        raise AssertionError(f"{path} opened although the folder did not change")

    monkeypatch.setattr(sources, "_file_problem", no_checks)
    with pytest.warns(TntWarning):
        again = resolve_source(str(image_folder))
    assert again.skipped == first.skipped and again.train.samples == first.train.samples
    (image_folder / "val" / "emu" / "0.jpg").write_bytes(b"changed")   # new size: that split is re-checked
    with pytest.raises(AssertionError, match="opened although"):
        resolve_source(str(image_folder))
