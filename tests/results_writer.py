"""A results writer for tests/test_reliability.py's concurrent-writers test, in its own module so that a spawned
worker imports only tntcli.results (pandas) to unpickle it, not the test module's torch and engine (3-4 s each)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from tntcli.results import atomic_write_text, locked


def append_rows(folder: str, worker: int, rows: int = 20) -> None:
    """Read-modify-write `folder/table.csv` `rows` times under the results lock, one row per write."""
    for i in range(rows):
        with locked(folder):
            path = Path(folder) / "table.csv"
            old = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=["worker", "i"])
            new = pd.concat([old, pd.DataFrame([{"worker": worker, "i": i}])], ignore_index=True)
            atomic_write_text(path, new.to_csv(index=False))
