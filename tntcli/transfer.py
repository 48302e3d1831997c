"""`tnt transfer`: fine-tune a pretrained TNT/DeiT on a downstream dataset (the paper's Table 9), over the engine.

The training engine does the work: with `model.pretrained` set it loads any supported checkpoint, starts a fresh
head for the new classes and resizes the sentence position embedding to the new patch grid (bicubic; the word
position embedding is per patch and keeps its shape). This module builds that RunConfig (flags > what the
checkpoint says about itself > the transfer recipe), checks the inputs before any data is read, and tabulates
finished transfer runs against the paper's figures.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from tntcli.config import RECIPES, RunConfig, build_config, load_recipe, run_model_config
from tntcli.data.sources import list_class_folders, resolve_source
from tntcli.errors import TntError
from tntcli.models.weights import (OURS, guess_model_name, load_weights, read_checkpoint, to_ours,
                                       unwrap_state_dict)
from tntcli.models.registry import build_model, config_to_dict, model_config
from tntcli.paper import paper_figures
from tntcli.results import data_label, folder_label, write_table
from tntcli.runs import find_runs

# Config fields that a checkpoint does not fix for fine-tuning: the rest of a saved config is its architecture.
_NOT_ARCH = ("img_size", "num_classes", "drop_path_rate")


# ------------------------------------------------------------------------------------------------ config
def default_recipe(data: str | None) -> str:
    """`transfer/<name>` for the named datasets that have one (cifar10, cifar100, flowers102, pets), else
    `transfer/default` (short fine-tuning settings for any other data, never the ImageNet pre-training ones)."""
    name = (data or "").lower()
    return f"transfer/{name}" if name and (RECIPES / "transfer" / f"{name}.yaml").is_file() else "transfer/default"


def transfer_config(checkpoint: str | Path, *, recipe: str | None = None,
                    overrides: dict[str, Any] | None = None) -> RunConfig:
    return _transfer_config(checkpoint, recipe, overrides)[0]


def _transfer_config(checkpoint: str | Path, recipe: str | None,
                     overrides: dict[str, Any] | None) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """The RunConfig of a fine-tuning run; raises TntError (before any data is read) when the inputs cannot work.

    The model is `--model`, else the one the checkpoint records (ours) or whose shapes it has (foreign), else the
    recipe's. Our own checkpoints also give their architecture and, when neither flags nor recipe set one, their
    image size.
    """
    overrides = dict(overrides or {})
    recipe_dict = load_recipe(recipe if recipe is not None else default_recipe(overrides.get("data.data")))
    obj = read_checkpoint(checkpoint)
    fmt, sd = to_ours(unwrap_state_dict(obj))
    recipe_model = recipe_dict.get("model") or {}
    derived: dict[str, Any] = {}
    if obj.get("format") == OURS:
        saved = obj["config"]
        default = config_to_dict(model_config(obj["model_name"]))
        if overrides.get("model.name", obj["model_name"]) == obj["model_name"]:
            derived["model.name"] = obj["model_name"]
            derived["model.arch"] = {k: v for k, v in saved.items() if k not in _NOT_ARCH and v != default[k]}
        if "model.img_size" not in overrides and "img_size" not in recipe_model:
            derived["model.img_size"] = saved["img_size"]
    elif "model.name" not in overrides:
        guess = guess_model_name(sd) or recipe_model.get("name")
        if guess is None:
            raise TntError(f"cannot tell which model {checkpoint} is for; pass --model")
        derived["model.name"] = guess
    cfg = build_config(recipe_dict, {**derived, **overrides, "model.pretrained": str(checkpoint)})
    check_fits(cfg, sd, source=f"checkpoint {checkpoint} ({fmt})")
    check_classes(cfg.data.data)
    return cfg, sd


def check_fits(cfg: RunConfig, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load `sd` as the engine will (new head, resized position embedding) into a shapes-only model."""
    model_cfg = run_model_config(cfg)             # an img_size off the patch grid is a TntError here
    with torch.device("meta"):                    # no memory, no init: only the shapes are checked
        model = build_model(model_cfg)
    with warnings.catch_warnings():               # "copying into a meta parameter is a no-op": that is the point
        warnings.simplefilter("ignore")
        load_weights(model, sd, name=cfg.model.name, reset_head=True, source=source)


NAMED_CLASSES = {"cifar10": 10, "cifar100": 100, "flowers102": 102, "pets": 37, "digits": 10}


def data_classes(data: str | None) -> int | None:
    """The number of classes of a dataset where that is cheap to know (named sets, class folders, .beton metadata)."""
    if data is None:
        return None
    if data.lower() in NAMED_CLASSES:
        return NAMED_CLASSES[data.lower()]
    if data.endswith(".beton"):
        return resolve_source(data).num_classes
    train = Path(data).expanduser() / "train"
    return len(list_class_folders(train)) if train.is_dir() else None   # the data layer names what is missing


def check_classes(data: str | None) -> None:
    """A classifier needs two classes; checked where that is cheap."""
    count = data_classes(data)
    if count is not None and count < 2:
        raise TntError(f"--data {data} has {count} class{'' if count == 1 else 'es'}; "
                       "fine-tuning a classifier needs at least 2")


def head_swap(sd: dict[str, torch.Tensor], data: str | None) -> str:
    """The line saying that the checkpoint's classifier is replaced: `head: 1000 -> 3 classes (...)`."""
    old = sd["head.weight"].shape[0] if "head.weight" in sd else "no"
    new = data_classes(data)
    return f"head: {old} -> {'the data' if new is None else new} classes (a new, randomly initialised head)"


def run_transfer(checkpoint: str | Path | None, *, recipe: str | None = None, overrides: dict[str, Any] | None = None,
                 out: Path | None = None, resume: Path | None = None, overwrite: bool = False,
                 console=None) -> dict[str, Any]:
    """Fine-tune (or continue a fine-tuning run) with the training engine; returns its summary."""
    from tntcli.engine.train import resume_config, train

    if resume is not None:
        if checkpoint is not None or recipe is not None or out is not None:
            raise TntError("--resume continues a run with its saved recipe; drop --checkpoint/--recipe/--out")
        return train(resume_config(resume, overrides or {}), resume=resume, console=console)
    if checkpoint is None:
        raise TntError("--checkpoint is required: the pretrained weights to fine-tune (or --resume RUN / --table)")
    cfg, sd = _transfer_config(checkpoint, recipe, overrides)
    if console is not None:
        console.print(f"recipe: {recipe or default_recipe(cfg.data.data)}; {head_swap(sd, cfg.data.data)}")
    if out is None:
        img_size = run_model_config(cfg).img_size
        out = Path("runs") / f"transfer-{cfg.model.name}-{img_size}px-{data_label(cfg.data.data)}-" \
                             f"{time.strftime('%Y%m%d-%H%M%S')}"
    return train(cfg, out=out, overwrite=overwrite, console=console)


def run_transfer_seeds(checkpoint: str | Path | None, seeds: list[int], *, recipe: str | None = None,
                       overrides: dict[str, Any] | None = None, out: Path | None = None,
                       console=None) -> list[dict[str, Any]]:
    """One fine-tuning run per seed in `<out>/seed-<k>` (reused when finished, resumed when interrupted); the
    default folder is named by the config without its seed, so rerunning the command finds its runs."""
    from tntcli.seeds import config_digest, train_seeds

    if checkpoint is None:
        raise TntError("--checkpoint is required: the pretrained weights to fine-tune")
    cfg = transfer_config(checkpoint, recipe=recipe, overrides=overrides)
    if out is None:
        out = Path("runs") / f"transfer-{cfg.model.name}-{run_model_config(cfg).img_size}px-" \
                             f"{data_label(cfg.data.data)}-{config_digest(cfg, ignore_seed=True)}"
    return train_seeds(cfg, seeds, out, console=console)


def summary_line(summary: dict[str, Any]) -> str:
    return (f"done: {summary['model']} at {summary['img_size']}px on {summary['data']} ({summary['num_classes']} "
            f"classes): final top-1 {summary['final_top1']:.2f}%, best {summary['best_top1']:.2f}% "
            f"({summary['best_source']}, epoch {summary['best_epoch']})")


# ------------------------------------------------------------------------------------------------ table
TABLE_COLUMNS = ["model", "img_size", "dataset", "init", "paper_top1", "paper_note", "ours_top1", "ours_best_top1",
                 "epochs", "seed", "status", "run"]


def paper_transfer() -> dict[str, Any]:
    """The paper's Table 9 figures (top-1 %, fine-tuned at 384px from ImageNet-1k), as printed."""
    return paper_figures()["transfer"]


def _run_rows(runs_dir: Path) -> list[dict[str, Any]]:
    """One row per run folder under `runs_dir` (with a config.yaml), fine-tuned or from scratch."""
    rows = []
    for run in find_runs(runs_dir):
        if run["config"] is None:
            continue
        pretrained = run["pretrained"]
        rows.append({"model": run["model"], "img_size": run["img_size"], "dataset": data_label(run["data"]),
                     "init": "/".join(Path(pretrained).parts[-2:]) if pretrained else "scratch",
                     "ours_top1": _percent(run.get("final_top1")), "ours_best_top1": _percent(run.get("best_top1")),
                     "epochs": f"{run['epochs_done']}/{run['epochs']}", "status": run["status"], "seed": run["seed"],
                     "run": str(Path(run["run_dir"]).relative_to(runs_dir))})
    return rows


def _percent(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _paper_gap(row: dict[str, Any], entry: dict[str, Any]) -> str:
    """'' when a run is in the paper's Table 9 setting (its model and dataset, fine-tuned from weights at the
    paper's size), else why its paper_top1 is empty."""
    if not entry:
        return f"the paper's Table 9 has no {row['model']}"
    if row["dataset"] not in entry or entry.get(row["dataset"]) is None:
        return f"the paper's Table 9 has no {row['model']} on {row['dataset']}"
    if row["img_size"] != entry["img_size"]:
        return f"{row['img_size']}px, not the paper's {entry['img_size']}px"
    return "" if row["init"] != "scratch" else "trained from scratch, not fine-tuned"


def transfer_table(runs_dir: str | Path) -> pd.DataFrame:
    """The paper's Table 9 next to our transfer runs (and from-scratch runs on the same datasets, as baselines).

    Every paper entry gets a row, with ours blank when not run; every run gets its own row.
    """
    paper = paper_transfer()
    rows = _run_rows(Path(runs_dir))
    transfer_sets = {r["dataset"] for r in rows if r["init"] != "scratch"}
    rows = [r for r in rows if r["dataset"] in transfer_sets]
    for r in rows:
        entry = paper["top1"].get(r["model"], {})
        r["paper_note"] = _paper_gap(r, entry)
        r["paper_top1"] = None if r["paper_note"] else entry[r["dataset"]]
    covered = {(r["model"], r["img_size"], r["dataset"]) for r in rows if r["init"] != "scratch"}
    for model, entry in paper["top1"].items():
        for dataset in paper["datasets"]:
            if (model, entry["img_size"], dataset) not in covered:
                rows.append({"model": model, "img_size": entry["img_size"], "dataset": dataset, "init": "ImageNet-1k",
                             "paper_top1": entry.get(dataset), "status": "not run here"})
    order = {m: i for i, m in enumerate(paper["top1"])}
    datasets = {d: i for i, d in enumerate(paper["datasets"])}
    df = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    df = df.assign(_m=df.model.map(order).fillna(len(order)), _d=df.dataset.map(datasets).fillna(len(datasets)))
    return df.sort_values(["_m", "model", "_d", "dataset", "img_size", "init"]).drop(columns=["_m", "_d"]) \
        .reset_index(drop=True)


def write_transfer_table(runs_dir: str | Path = "runs", results_dir: str | Path = "results") -> list[Path]:
    """results/transfer.md and transfer.csv from the run folders under `runs_dir`."""
    paper = paper_transfer()
    footnotes = [
        f"paper_top1: the paper's figures, not measured here ({paper_figures()['source'].split(' (')[0]}; "
        f"{paper['table']}): {paper['note']}.",
        "ours_top1: final-epoch top-1 (%) on the dataset's val/test split, from each run's summary.json; "
        "ours_best_top1: best epoch (model or EMA) on that same split, so an optimistic pick.",
        "paper_note: why a run has no paper figure beside it (another size, model or data set than the paper's "
        "Table 9, or trained from scratch).",
        "init: the checkpoint a run was fine-tuned from (folder/file), or `scratch` (a from-scratch baseline on a "
        "dataset that a transfer run used). run: the run folder under the runs folder.",
        "seed: the run's train.seed (`tnt transfer --seeds N` makes one run folder per seed).",
        f"Built by `tnt transfer --table --runs {folder_label(runs_dir)}`.",
    ]
    return write_table(transfer_table(runs_dir), results_dir, "transfer",
                       "Transfer learning: ours vs the paper's Table 9 (top-1 %)", footnotes)
