"""Several seeds of one run (`--seeds 3` or `--seeds 0,1,2`): each seed its own run folder, reused once finished,
resumed when interrupted, so a stopped multi-seed command continues where it stopped.

A seed sets everything random in a run: initialisation, data order, augmentation draws and dropout
(`train.seed`). After a run finishes, the weights that gave its best top-1 (best.pt) are evaluated once more image
by image into `val_predictions.csv` (columns image, label, pred, correct): what a one-seed comparison needs for
a bootstrap over validation images (tntcli.stats).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tntcli.config import RunConfig, build_config
from tntcli.errors import TntError
from tntcli.results import atomic_write_text
from tntcli.runs import read_run

PREDICTIONS = "val_predictions.csv"


def parse_seeds(text: str | None, first: int = 0) -> list[int] | None:
    """`--seeds N`: N seeds counted from `first` (the recipe's or --seed's); `--seeds 0,3,7`: those seeds.
    None: the flag was not given (one run, as before)."""
    if text is None:
        return None
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise TntError(f"--seeds expects a count (--seeds 3) or a comma-separated list (--seeds 0,1,2), "
                       f"got '{text}'") from None
    if not values:
        raise TntError("--seeds is empty: give a count (--seeds 3) or a list (--seeds 0,1,2)")
    if "," not in str(text):
        if values[0] < 1:
            raise TntError(f"--seeds {values[0]}: the number of seeds must be at least 1")
        return list(range(first, first + values[0]))
    if len(set(values)) != len(values):
        raise TntError(f"--seeds {text} lists a seed twice")
    return values


def with_seed(cfg: RunConfig, seed: int) -> RunConfig:
    return build_config(cfg.to_dict(), {"train.seed": seed})


def config_digest(cfg: RunConfig, *, ignore_seed: bool = False) -> str:
    """10 hex digits of the whole config (without train.seed: the name shared by a run's seeds)."""
    d = cfg.to_dict()
    if ignore_seed:
        d["train"] = {k: v for k, v in d["train"].items() if k != "seed"}
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def run_state(path: Path) -> str:
    """done (completed, or failed for good), resume (a checkpoint to continue from) or new."""
    summary = read_run(path)
    status = (summary or {}).get("status", "")
    if status == "completed" or status.startswith("failed"):
        return "done"
    return "resume" if (path / "last.pt").is_file() else "new"


ACTIONS = {"done": "reusing finished run", "resume": "resuming", "new": "training"}


def train_or_reuse(cfg: RunConfig, path: Path, train: Callable[..., Any], console=None) -> str:
    """Reuse a finished run in `path`, resume an interrupted one or train a new one; then write its per-image
    predictions if missing. `train` is the engine's (passed in so callers and tests can substitute it)."""
    state = run_state(path)
    _log(console, f"{ACTIONS[state]} {path}")
    if state == "resume":
        train(cfg, resume=path, console=console)
    elif state == "new":
        train(cfg, out=path, overwrite=True, console=console)     # a folder without checkpoint holds nothing
    if (read_run(path) or {}).get("status") == "completed" and not (path / PREDICTIONS).is_file():
        write_val_predictions(path)
    return state


def train_seeds(cfg: RunConfig, seeds: list[int], out: Path, train: Callable[..., Any] | None = None,
                console=None) -> list[dict[str, Any]]:
    """`out/seed-<k>` for each seed: trained, resumed or reused. Returns each seed's summary with its folder."""
    if train is None:
        from tntcli.engine.train import train
    summaries = []
    for seed in seeds:
        path = out / f"seed-{seed}"
        _log(console, f"[bold]seed {seed}[/]:")
        train_or_reuse(with_seed(cfg, seed), path, train, console)
        summaries.append({**(read_run(path) or {}), "seed": seed, "run_dir": str(path)})
    return summaries


def seeds_line(summaries: list[dict[str, Any]]) -> str:
    """`best top-1 over 3 seeds: 61.20 ± 0.85 (60.3, 61.4, 61.9)`: mean ± sample std of the seeds' best top-1."""
    from tntcli.stats import spread

    top1 = [s.get("best_top1") for s in summaries]
    s = spread(top1)
    std = "" if s.n < 2 else f" ± {s.std:.2f}"
    return (f"best top-1 over {s.n} seed{'s' if s.n != 1 else ''}: {s.mean:.2f}{std} "
            f"({', '.join('–' if v is None else f'{v:.2f}' for v in top1)})")


# ----------------------------------------------------------------------------------------------- per image
def write_val_predictions(run_dir: Path) -> Path:
    """Evaluate the run's best.pt on its validation split, image by image, as the engine evaluates it (same
    data, transform and image order); writes `val_predictions.csv` atomically."""
    import pandas as pd
    import torch
    import yaml

    from tntcli.data import build_loaders
    from tntcli.engine.evaluate import evaluate
    from tntcli.models.weights import load_checkpoint
    from tntcli.models.registry import get_spec

    run_dir = Path(run_dir)
    cfg = build_config(yaml.safe_load((run_dir / "config.yaml").read_text()))
    model, _ = load_checkpoint(run_dir / "best.pt")
    spec, device = get_spec(cfg.model.name), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loaders = build_loaders(cfg.data.data, data_root=cfg.data.data_root, img_size=model.cfg.img_size,
                            batch_size=cfg.data.batch_size, workers=cfg.data.workers,
                            mean=tuple(cfg.data.mean or spec.mean), std=tuple(cfg.data.std or spec.std),
                            crop_pct=cfg.data.crop_pct or spec.crop_pct, interpolation=spec.interpolation, aug=None,
                            device=device, drop_last=False, eval_only=True, strict=cfg.data.strict)
    try:
        result = evaluate(model.to(device), loaders.val, per_image=True)
    finally:
        loaders.close()
    labels, preds = np.asarray(result["labels"]), np.asarray(result["preds"])
    df = pd.DataFrame({"image": np.arange(len(labels)), "label": labels, "pred": preds,
                       "correct": (labels == preds).astype(int)})
    return atomic_write_text(run_dir / PREDICTIONS, df.to_csv(index=False))


def read_val_predictions(run_dir: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels, correct) of a run's validation images, or None when it has no val_predictions.csv."""
    import pandas as pd

    path = Path(run_dir) / PREDICTIONS
    if not path.is_file():
        return None
    df = pd.read_csv(path)
    return df.label.to_numpy(), df.correct.to_numpy().astype(bool)


def paired_correct(variant_dir: str | Path, base_dir: str | Path) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Per-image correctness of two runs on the same validation images, or (None, None) when either run has no
    predictions or their images differ (other data, other order)."""
    a, b = read_val_predictions(variant_dir), read_val_predictions(base_dir)
    if a is None or b is None or len(a[0]) != len(b[0]) or not (a[0] == b[0]).all():
        return None, None
    return a[1], b[1]


def _log(console, text: str) -> None:
    if console is not None:
        console.print(text)
