"""FFCV path: write_beton round trip and atomicity, loaders. Numba compiles each pipeline once per process
(seconds), so one module-scoped set of loaders serves every loader test."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_image_folder

from tntcli.data import AugmentSettings, build_loaders, resolve_source
from tntcli.errors import TntError

# slow: the first FFCV loader in a process pays ~10 s of numba compilation, and writing the module's .beton ~4 s
pytestmark = [pytest.mark.ffcv, pytest.mark.slow]
FULL = AugmentSettings()


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, Path]:
    """(image folder, X.beton prefix) with X-train.beton + X-val.beton written from it."""
    from tntcli.data.ffcv import write_beton

    root = tmp_path_factory.mktemp("ffcv")
    folder = make_image_folder(root / "imgs")
    paths = write_beton(str(folder), root / "tiny.beton", num_workers=1, progress=False)
    assert [p.name for p in paths] == ["tiny-train.beton", "tiny-val.beton"]
    return folder, root / "tiny.beton"


@pytest.fixture(scope="module")
def ffcv_loaders(written):
    lds = build_loaders(str(written[1]), img_size=16, batch_size=4, workers=1, aug=FULL)
    yield lds
    lds.close()


def test_round_trip_keeps_labels_classes_and_counts(written, ffcv_loaders):
    lds = ffcv_loaders
    assert (lds.n_train, lds.n_val, lds.classes, lds.num_classes) == (24, 9, ["cat", "dog", "emu"], 3)
    labels = torch.cat([y.clone() for _, y in lds.val])
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # val: sequential, last batch kept
    assert len(lds.val) == 3 and len(lds.train) == 6


def test_both_paths_give_the_same_batch_format(written, ffcv_loaders):
    tv = build_loaders(str(written[0]), img_size=16, batch_size=4, workers=0, aug=FULL)
    for split in ("train", "val"):
        (fx, fy), (tx, ty) = next(iter(getattr(ffcv_loaders, split))), next(iter(getattr(tv, split)))
        assert fx.shape == tx.shape == (4, 3, 16, 16) and fx.dtype == tx.dtype == torch.float32
        assert fy.dtype == ty.dtype == torch.int64 and fy.shape == ty.shape
        if split == "val":  # train batches hold random erasing's N(0, 1) noise
            assert fx.min() >= -1 - 1e-5 and fx.max() <= 1 + 1e-5  # normalised with mean = std = 0.5
    fx, fy = next(iter(ffcv_loaders.train))
    out, targets = ffcv_loaders.batch_augment(fx, fy)  # MixUp/CutMix, the same on both paths
    tv_out, tv_targets = tv.batch_augment(*next(iter(tv.train)))
    assert out.shape == tv_out.shape and targets.shape == tv_targets.shape == (4, 3)
    assert torch.allclose(targets.sum(1), torch.ones(4))


def test_epoch_order_is_a_function_of_seed_and_epoch(ffcv_loaders):
    def labels(epoch):
        ffcv_loaders.set_epoch(epoch)
        return torch.cat([y.clone() for _, y in ffcv_loaders.train]).tolist()

    first = labels(2)
    assert labels(2) == first
    assert labels(5) != first


def test_batch_augment_is_reproducible(ffcv_loaders):
    images, labels = next(iter(ffcv_loaders.val))
    images = images.clone()
    ffcv_loaders.batch_augment.set_epoch(4)
    a = ffcv_loaders.batch_augment(images, labels)
    ffcv_loaders.batch_augment.set_epoch(4)
    b = ffcv_loaders.batch_augment(images, labels)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_a_resumed_epoch_passes_over_earlier_batches_without_augmenting_them(ffcv_loaders):
    val = ffcv_loaders.val                          # sequential order: the same labels in every epoch
    whole = [labels.clone() for _, labels in val.epoch()]
    pipeline, seeds = val.pipeline, []
    val.pipeline = lambda images, seed: seeds.append(seed) or pipeline(images, seed)
    try:
        resumed = [labels.clone() for _, labels in val.epoch(skip=1)]
    finally:
        val.pipeline = pipeline
    assert len(whole) == 3 and len(resumed) == len(seeds) == 2
    assert all(torch.equal(a, b) for a, b in zip(whole[1:], resumed))


def test_stopping_early_ends_the_ffcv_thread(ffcv_loaders):
    batches = ffcv_loaders.train.epoch()
    next(batches)
    iterator = ffcv_loaders.train._live
    batches.close()  # what a `break` out of the for loop does
    assert not iterator.is_alive()
    assert len(list(ffcv_loaders.train.epoch(max_steps=2))) == 2
    for _ in ffcv_loaders.val:
        break
    ffcv_loaders.close()


def test_single_file_from_a_class_folder_root(tmp_path, written):
    from tntcli.data.ffcv import write_beton

    (out,) = write_beton(str(written[0] / "val"), tmp_path / "eval.beton", num_workers=1, progress=False)
    source = resolve_source(str(out))
    assert source.train_path == source.val_path == out and source.classes == ["cat", "dog", "emu"]


def test_failed_write_leaves_no_file(tmp_path, written, monkeypatch):
    import tntcli.data.ffcv as ffcv_mod

    real = ffcv_mod._load_item

    def fails_at_5(dataset, index):
        if index == 5:
            raise ValueError("disk on fire")
        return real(dataset, index)

    monkeypatch.setattr(ffcv_mod, "_load_item", fails_at_5)  # workers fork, so they see it too
    with pytest.raises(TntError, match="disk on fire"):
        ffcv_mod.write_beton(str(written[0] / "val"), tmp_path / "bad.beton", num_workers=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_write_creates_a_missing_output_folder(tmp_path, written):
    from tntcli.data.ffcv import write_beton

    paths = write_beton(str(written[0] / "val"), tmp_path / "new" / "deeper" / "v.beton", num_workers=1,
                        progress=False)
    assert [p.name for p in paths] == ["v.beton"] and paths[0].is_file()


def test_write_errors(tmp_path, written):
    from tntcli.data.ffcv import write_beton

    (tmp_path / "a-file").write_text("")
    with pytest.raises(TntError, match="cannot create output folder"):
        write_beton(str(written[0]), tmp_path / "a-file" / "x.beton")
    with pytest.raises(TntError, match="must end with .beton"):
        write_beton(str(written[0]), tmp_path / "x.ffcv")
    with pytest.raises(TntError, match="neither"):
        resolve_source(str(tmp_path / "absent.beton"))


def test_existing_beton_is_refused_unless_overwrite(tmp_path, written):
    from tntcli.data.ffcv import write_beton

    (out,) = write_beton(str(written[0] / "val"), tmp_path / "v.beton", num_workers=1, progress=False)
    before = out.stat().st_mtime_ns
    with pytest.raises(TntError, match="--overwrite"):
        write_beton(str(written[0] / "val"), out, num_workers=1, progress=False)
    assert out.stat().st_mtime_ns == before
    write_beton(str(written[0] / "val"), out, num_workers=1, progress=False, overwrite=True)
    assert out.stat().st_mtime_ns != before


def test_a_photo_too_large_for_a_page_names_the_flag_and_the_default_fits(tmp_path):
    """A raw 1800x1700 photo (9.2 MB) overflows ffcv's 8 MiB page; the ffcv-imagenet default (500 px) fits."""
    import numpy as np
    from PIL import Image

    from tntcli.data.ffcv import page_size_for, write_beton

    folder = tmp_path / "big" / "cls"
    folder.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (1700, 1800, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "0.png")
    with pytest.raises(TntError, match="--max-resolution"):
        write_beton(str(tmp_path / "big"), tmp_path / "raw.beton", max_resolution=0, write_mode="raw",
                    num_workers=1, progress=False)
    assert not (tmp_path / "raw.beton").exists()
    (out,) = write_beton(str(tmp_path / "big"), tmp_path / "small.beton", write_mode="raw", num_workers=1,
                         progress=False)
    assert out.is_file()
    assert page_size_for(500) == 1 << 23 and page_size_for(2000) == 1 << 24 and page_size_for(0) == 1 << 23


def test_eval_on_a_beton_pair_never_opens_the_train_file(tmp_path, written):
    import shutil

    for suffix in ("-val.beton", "-val.beton.json"):
        shutil.copy(str(written[1]).replace(".beton", suffix), tmp_path / f"p{suffix}")
    (tmp_path / "p-train.beton").write_bytes(b"not a beton")     # opening it would fail
    lds = build_loaders(str(tmp_path / "p.beton"), img_size=16, batch_size=4, workers=1, aug=None, eval_only=True)
    try:
        assert lds.n_val == 9 and torch.cat([y.clone() for _, y in lds.val]).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    finally:
        lds.close()
    with pytest.raises(TntError, match="not a readable .beton"):
        build_loaders(str(tmp_path / "p.beton"), img_size=16, batch_size=4, workers=1, aug=None)
