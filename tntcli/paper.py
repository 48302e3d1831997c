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
