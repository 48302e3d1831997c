"""Progress for long loops: a rich bar with loss, lr, img/s and ETA on a terminal, plain log lines otherwise."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class _Bar:
    def __init__(self, progress: Progress | None, task, total: int, log, label: str):
        self.progress, self.task, self.total, self.log, self.label = progress, task, total, log, label
        self.done, self.last_log, self.stats = 0, time.perf_counter(), {}

    def update(self, **stats: float) -> None:
        """One step done; `stats` replace the shown values of the same name (others keep their last value)."""
        self.done += 1
        self.stats.update(stats)
        text = "  ".join(f"{k.replace('_per_', '/')} {v:.4g}" for k, v in self.stats.items())
        if self.progress is not None:
            self.progress.update(self.task, advance=1, stats=text)
        elif time.perf_counter() - self.last_log > 10 or self.done == self.total:   # plain: every 10 s
            self.log(f"{self.label} step {self.done}/{self.total}  {text}")
            self.last_log = time.perf_counter()


class Reporter:
    """Rank 0 reports; other ranks get a reporter that prints nothing."""

    def __init__(self, console: Console | None = None, enabled: bool = True):
        self.console = console or Console()
        self.enabled = enabled

    def log(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False)

    @contextlib.contextmanager
    def epoch(self, epoch: int, epochs: int, steps: int) -> Iterator[_Bar]:
        with self.bar(f"epoch {epoch + 1}/{epochs}", steps) as bar:
            yield bar

    @contextlib.contextmanager
    def bar(self, label: str, total: int) -> Iterator[_Bar]:
        if not self.enabled or not self.console.is_terminal:
            yield _Bar(None, None, total, self.log if self.enabled else (lambda m: None), label)
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=False) as progress:
            yield _Bar(progress, progress.add_task(label, total=total, stats=""), total, self.log, label)

    def epoch_done(self, row: dict[str, Any]) -> None:
        parts = [f"epoch {row['epoch']}", f"train_loss {row['train_loss']:.4f}", f"{row['img_per_s']:.1f} img/s"]
        if row.get("val_top1") is not None:
            parts += [f"val_loss {row['val_loss']:.4f}", f"top1 {row['val_top1']:.2f}", f"top5 {row['val_top5']:.2f}"]
        if row.get("ema_top1") is not None:
            parts.append(f"ema_top1 {row['ema_top1']:.2f}")
        self.log("  ".join(parts))
