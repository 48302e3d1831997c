"""Figures printed in the TNT paper, read from the one data file `paper.json`. Always shown labelled as the paper's."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

_FILE = Path(__file__).with_name("paper.json")


@lru_cache(maxsize=1)
def paper_figures() -> dict[str, Any]:
    return json.loads(_FILE.read_text())


def model_figures(name: str) -> dict[str, Any]:
    """Paper params (M), GMACs, top-1 and table of a named model; empty when the paper has none."""
    return paper_figures()["models"].get(name, {})


# ----------------------------------------------------------------------------------------------- setting
PAPER_IMG_SIZE = 224
PAPER_DATA = "ImageNet-1k"
PAPER_SETTING_TEXT = f"{PAPER_DATA}, {PAPER_IMG_SIZE}px, unmodified model"


def is_imagenet_1k(data_label: str | None, num_classes: int | None) -> bool:
    """Whether data is ImageNet-1k: 1000 classes and a name that says so (`imagenet`/`ilsvrc` in the folder or
    file name, e.g. /data/imagenet, ILSVRC2012_val, imagenet-val.beton). A simple, documented rule: a
    1000-class set named otherwise is not taken for ImageNet."""
    name = (data_label or "").lower()
    return num_classes == 1000 and ("imagenet" in name or "ilsvrc" in name)


def setting_gap(model: str, arch: dict | str | None, img_size: int | None, data_label: str | None,
                num_classes: int | None) -> str | None:
    """None when a run is in the paper's setting (a model the paper reports, its architecture unmodified,
    224px, ImageNet-1k), so the paper's figure may stand beside ours; otherwise why not, in a few words."""
    reasons = []
    if model not in paper_figures()["models"]:
        reasons.append(f"the paper has no {model}")
    if arch:
        reasons.append("modified architecture")
    if img_size != PAPER_IMG_SIZE:
        reasons.append(f"{img_size}px")
    if not is_imagenet_1k(data_label, num_classes):
        reasons.append(f"{data_label or '?'} ({num_classes} classes)")
    return None if not reasons else f"not the paper's setting ({PAPER_SETTING_TEXT}): " + ", ".join(reasons)


IMAGENET_VAL_IMAGES = 50_000


def eval_beside_paper(model: str, data: str, img_size: int, n_images: int) -> str | None:
    """`tnt eval`'s line on the paper: its top-1/top-5 when the evaluation is the paper's (a model it reports at
    224px on the ImageNet-1k val split: a data name with `imagenet`/`ilsvrc` and all 50,000 val images), else
    why not; None for models the paper does not report."""
    from tntcli.results import data_label

    figures = paper_figures()["models"].get(model)
    if figures is None:
        return None
    label = data_label(data)
    reasons = [f"{img_size}px"] if img_size != PAPER_IMG_SIZE else []
    if not ("imagenet" in label.lower() or "ilsvrc" in label.lower()) or n_images != IMAGENET_VAL_IMAGES:
        reasons.append(f"{label} ({n_images} images), not the {IMAGENET_VAL_IMAGES} ImageNet-1k val images")
    if reasons:
        return f"paper figures not shown: not the paper's setting ({', '.join(reasons)})"
    top5 = f", top-5 {figures['top5']:.1f}%" if figures.get("top5") is not None else ""
    return f"paper ({figures['table']}, {paper_figures()['version'].split(' (')[0]}): top-1 {figures['top1']:.1f}%{top5}"
