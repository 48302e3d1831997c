"""Evaluation: top-1/top-5/loss over a loader (reduced over ranks), and the `tnt eval` record."""
from __future__ import annotations

import functools
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from tntcli.engine import distributed, runtime


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, env: distributed.DistEnv | None = None,
             autocast: Callable = nullcontext, progress=None, per_image: bool = False) -> dict[str, Any]:
    """Loss, top-1 and top-5 (percent) and images/s of `model` on `loader` (each rank its shard).

    `per_image`: also `labels` and `preds` (top-1 class), lists in loader order over this rank's images (for
    paired bootstraps over validation images; see tntcli.stats)."""
    env = env or distributed.DistEnv()
    was_training = model.training
    model.eval()
    loss_sum = correct1 = correct5 = n = 0.0
    seen_labels, preds = [], []
    t0 = time.perf_counter()
    for images, labels in loader:
        with autocast():
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top5 == labels[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        n += labels.shape[0]
        if per_image:
            seen_labels.append(labels.cpu())
            preds.append(top5[:, 0].cpu())
        if progress is not None:
            progress(labels.shape[0])
    seconds = time.perf_counter() - t0
    loss_sum, correct1, correct5, n = distributed.all_reduce_sum([loss_sum, correct1, correct5, n], env)
    model.train(was_training)
    if n == 0:
        return {"loss": float("nan"), "top1": float("nan"), "top5": float("nan"), "n_images": 0, "img_per_s": 0.0}
    out = {"loss": loss_sum / n, "top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n,
           "n_images": int(n), "img_per_s": n / seconds if seconds > 0 else float("nan")}
    if per_image:
        out.update(labels=torch.cat(seen_labels).tolist(), preds=torch.cat(preds).tolist())
    return out


EVAL_COLUMNS = ["model", "checkpoint", "ema", "data", "top1", "top5", "loss", "img_per_s", "n_images", "img_size",
                "crop_pct", "device"]


def run_eval(*, model_name: str | None, checkpoint: str, data: str, data_root: str | None = None,
             ema: bool = False, batch_size: int = 128, workers: int = 2, img_size: int | None = None,
             mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
             crop_pct: float | None = None, results_dir: str = "results", reporter=None) -> dict[str, Any]:
    """`tnt eval`: load any supported checkpoint, evaluate on the val split, append a row to results/eval.csv.

    The transform follows the checkpoint's convention (TNT: mean=std=0.5, crop 0.9; DeiT: ImageNet statistics,
    crop 0.875), bicubic, unless overridden.
    """
    from pathlib import Path

    import pandas as pd

    from tntcli.backends import apply_backend
    from tntcli.data import build_loaders
    from tntcli.errors import TntError
    from tntcli.models.weights import load_checkpoint
    from tntcli.models.registry import get_spec
    from tntcli.results import atomic_write_text, locked

    overrides = {"img_size": img_size} if img_size else {}
    model, name = load_checkpoint(checkpoint, model_name, ema=ema, **overrides)
    spec = get_spec(name)
    device = runtime.resolve_device("auto")
    loaders = build_loaders(data, data_root=data_root, img_size=model.cfg.img_size, batch_size=batch_size,
                            workers=workers, mean=tuple(mean or spec.mean), std=tuple(std or spec.std),
                            crop_pct=crop_pct or spec.crop_pct, interpolation=spec.interpolation, aug=None,
                            device=device, drop_last=False, eval_only=True)
    try:
        if loaders.num_classes != model.cfg.num_classes:
            raise TntError(f"the checkpoint classifies {model.cfg.num_classes} classes but {data} has "
                           f"{loaders.num_classes}; fine-tune it with `tnt transfer` first")
        model.to(device)
        dtype = runtime.amp_dtype("auto", device)
        apply_backend(model, device=device, dtype=dtype, training=False, batch_size=batch_size)
        autocast = functools.partial(runtime.autocast, device, dtype)
        if reporter is not None:
            with reporter.bar(f"eval {name}", len(loaders.val)) as bar:
                metrics = evaluate(model, loaders.val, autocast=autocast, progress=lambda n: bar.update())
        else:
            metrics = evaluate(model, loaders.val, autocast=autocast)
    finally:
        loaders.close()
    record = {"model": name, "checkpoint": str(checkpoint), "ema": ema, "data": data,
              "top1": round(metrics["top1"], 4), "top5": round(metrics["top5"], 4), "loss": round(metrics["loss"], 6),
              "img_per_s": round(metrics["img_per_s"], 2), "n_images": metrics["n_images"],
              "img_size": model.cfg.img_size, "crop_pct": crop_pct or spec.crop_pct,
              "device": runtime.device_name(device)}
    folder = Path(results_dir)
    with locked(folder):                                    # several evals may finish at once
        path = folder / "eval.csv"
        old = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=EVAL_COLUMNS)
        atomic_write_text(path, pd.concat([old, pd.DataFrame([record])], ignore_index=True).to_csv(index=False))
    return record
