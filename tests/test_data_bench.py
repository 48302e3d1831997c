"""`tnt data bench`: which augmentation each mode times, the data_bench.csv contract, and one tiny end-to-end run."""
from __future__ import annotations

import csv

import pytest
from conftest import make_image_folder

from tntcli.data import bench
from tntcli.errors import TntError


def test_each_mode_times_the_augmentation_its_label_names():
    crop_flip, label = bench.bench_augment(None)
    assert label == "crop+flip"
    assert (crop_flip.rand_augment, crop_flip.random_erasing, crop_flip.mixup, crop_flip.cutmix) == (None, 0, 0, 0)

    with_ra, label = bench.bench_augment(True)
    assert label == f"crop+flip+{bench.RAND_AUGMENT}" and with_ra.rand_augment == bench.RAND_AUGMENT

    recipe, label = bench.bench_augment(None, "tnt-s-imagenet")
    assert label == "recipe tnt-s-imagenet"
    assert recipe.rand_augment == "rand-m9-mstd0.5-inc1" and recipe.random_erasing == 0.25
    assert (recipe.mixup, recipe.cutmix) == (0.8, 1.0)
    assert bench.bench_augment(True, "tnt-s-imagenet") == (recipe, label)

    # the recipe minus RandAugment: everything else of the recipe stays
    without, label = bench.bench_augment(False, "tnt-s-imagenet")
    assert label == "recipe tnt-s-imagenet without RandAugment"
    assert without.rand_augment is None
    assert {**vars(without), "rand_augment": recipe.rand_augment} == vars(recipe)


def _result(augment: str = "crop+flip") -> bench.BenchResult:
    return bench.BenchResult(settings=dict(augment=augment, device="cpu (2 threads)", workers=2, batch_size=128),
                             images_per_s={"torchvision": [100.0, 300.0, 200.0], "ffcv": [900.0, 700.0, 800.0]})


def test_csv_rows_are_appended_with_the_contract_columns_and_medians(tmp_path):
    result = _result()
    assert result.ratio == pytest.approx(4.0)
    bench.append_csv(result, tmp_path)
    bench.append_csv(_result("recipe tnt-s-imagenet without RandAugment"), tmp_path)
    with open(tmp_path / "data_bench.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["loader", "augment", "device", "workers", "batch", "img_per_s"]
    assert rows[1:] == [["torchvision", "crop+flip", "cpu (2 threads)", "2", "128", "200.0"],
                        ["ffcv", "crop+flip", "cpu (2 threads)", "2", "128", "800.0"],
                        ["torchvision", "recipe tnt-s-imagenet without RandAugment", "cpu (2 threads)", "2", "128",
                         "200.0"],
                        ["ffcv", "recipe tnt-s-imagenet without RandAugment", "cpu (2 threads)", "2", "128", "800.0"]]


def test_a_csv_with_other_columns_is_left_alone(tmp_path):
    path = tmp_path / "data_bench.csv"
    path.write_text("loader,img_per_s\nffcv,1.0\n")
    with pytest.raises(TntError, match="other columns"):
        bench.append_csv(_result(), tmp_path)
    assert path.read_text() == "loader,img_per_s\nffcv,1.0\n"


@pytest.mark.parametrize("kwargs, message", [
    (dict(data="x.beton"), "not a .beton"),
    (dict(data="digits", repeats=0), "at least 1"),
])
def test_bad_arguments_fail_before_any_work(kwargs, message):
    with pytest.raises(TntError, match=message):
        bench.run_bench(**kwargs)


@pytest.mark.ffcv
@pytest.mark.slow
def test_a_tiny_bench_times_both_loaders_on_the_same_images(tmp_path):
    folder = make_image_folder(tmp_path / "imgs", per_class=(8, 2))
    result = bench.run_bench(str(folder), img_size=16, batch_size=4, workers=1, repeats=2,
                             recipe="tnt-s-imagenet", rand_augment=False, cache_dir=tmp_path / "cache")
    assert list(result.images_per_s) == ["torchvision", "ffcv"]
    assert all(len(rates) == 2 and min(rates) > 0 for rates in result.images_per_s.values())
    assert result.settings["images"] == 24 and result.settings["augment"].endswith("without RandAugment")
    assert (tmp_path / "cache" / "imgs-train.beton").is_file()
