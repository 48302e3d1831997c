"""Run folders as records: the one reader of what `tnt train` leaves in a run folder (summary.json, metrics.csv,
config.yaml and, for `tnt ablate`'s runs, its marker), for `tnt results`, `tnt ablate` and `tnt transfer --table`."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

ABLATION_MARKER = "ablation.json"     # `tnt ablate` marks its run folders with the variants they stand for


def read_run(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """One run folder as a record: summary.json's keys, plus `run_dir`, `history` (metrics.csv rows), `img_per_s`
    (the median training img/s over its epochs), `config` (config.yaml, None without one), `arch` (its
    model.arch overrides but img_size), `seed`, `pretrained` (model.pretrained: a fine-tuning run) and `ablation`
    (the marker, or None). None without a readable summary.json."""
    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    metrics, config_file, marker = run_dir / "metrics.csv", run_dir / "config.yaml", run_dir / ABLATION_MARKER
    history = pd.read_csv(metrics).to_dict("records") if metrics.is_file() else []
    speeds = pd.Series([row.get("img_per_s") for row in history], dtype=float).dropna()
    config = (yaml.safe_load(config_file.read_text()) or {}) if config_file.is_file() else None
    model = (config or {}).get("model") or {}
    return {**summary, "run_dir": str(run_dir), "history": history,
            "img_per_s": float(speeds.median()) if len(speeds) else None, "config": config,
            "arch": {k: v for k, v in (model.get("arch") or {}).items() if k != "img_size"},
            "seed": ((config or {}).get("train") or {}).get("seed", 0), "pretrained": model.get("pretrained"),
            "ablation": json.loads(marker.read_text()) if marker.is_file() else None}


def find_runs(root: str | os.PathLike) -> list[dict[str, Any]]:
    """Every run folder under `root`, at any depth (a folder holding summary.json), read, in path order."""
    records = (read_run(summary.parent) for summary in sorted(Path(root).rglob("summary.json")))
    return [r for r in records if r is not None]
