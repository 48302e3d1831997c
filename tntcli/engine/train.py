"""The training loop, top to bottom: run folder -> data -> model -> optimiser -> epochs -> summary.

Read it linearly; each section names the recipe knobs it uses (config.py holds their defaults and meaning).
Resume is exact: a checkpoint carries model, optimiser, scheduler, scaler, EMA, RNG state and position in the
epoch, and the data order and augmentation of an epoch depend only on (seed, epoch).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from tntcli.config import RunConfig, build_config, dump_yaml, run_model_config
from tntcli.data import build_loaders
from tntcli.engine import distributed
from tntcli.engine.checkpoint import load_verified, rng_state, save_verified, seed_everything, set_rng_state
from tntcli.engine.evaluate import evaluate
from tntcli.engine.progress import Reporter
from tntcli.engine.schedule import build_scheduler
from tntcli.errors import Preempted, TntError
from tntcli.models.checkpoints import load_pretrained, model_record
from tntcli.models.registry import build_model, get_spec
from tntcli.results import atomic_write_text

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "ema_top1", "img_per_s", "seconds"]
# ----------------------------------------------------------------------------------------------- run folder
def prepare_run_dir(cfg: RunConfig, out: Path | None, overwrite: bool) -> Path:
    if out is None:
        out = Path("runs") / f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise TntError(f"run folder {out} already exists; use --resume {out} to continue it, "
                           "--out for a new folder, or --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def resume_config(run_dir: Path, overrides: dict[str, Any]) -> RunConfig:
    """The saved config of a run, with flags given at resume (e.g. more epochs) applied on top."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise TntError(f"cannot resume: {saved} not found (is {run_dir} a run folder?)")
    import yaml

    return build_config(yaml.safe_load(saved.read_text()), overrides)


# ----------------------------------------------------------------------------------------------- optimiser
def param_groups(model: nn.Module, weight_decay: float, *, lr: float | None = None, layer_decay: float | None = None,
                 backbone_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups: no decay on norms, biases, position embeddings and the cls token. Frozen weights are left out.

    With `layer_decay` or `backbone_lr_scale` (fine-tuning), groups also carry lr = `lr` * lr_scale: block i of
    `depth` scales by layer_decay^(depth - i), the embeddings by layer_decay^(depth + 1), the final norm and the
    head by 1; everything but the head also by backbone_lr_scale. Highest lr first, so group 0 is the logged lr.
    """
    skip = model.no_weight_decay()
    depth = len(model.blocks)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = 1.0
        if not name.startswith("head."):
            scale = backbone_lr_scale * (layer_decay or 1.0) ** (depth + 1 - _layer_index(name, depth))
        groups.setdefault((scale, not (p.ndim <= 1 or name in skip)), []).append(p)
    if layer_decay is None and backbone_lr_scale == 1.0:
        return [{"params": groups.get((1.0, True), []), "weight_decay": weight_decay},
                {"params": groups.get((1.0, False), []), "weight_decay": 0.0}]
    return [{"params": params, "weight_decay": weight_decay if decays else 0.0, "lr": lr * scale, "lr_scale": scale}
            for (scale, decays), params in sorted(groups.items(), key=lambda g: (-g[0][0], not g[0][1]))]


def _layer_index(name: str, depth: int) -> int:
    """0 for the embeddings (everything before the blocks), i + 1 for blocks.i, depth + 1 for the final norm/head."""
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1 if name.startswith(("norm.", "head.")) else 0


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[setting]


# ----------------------------------------------------------------------------------------------- signals
class StopFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (a cluster's preemption notice)."""

    def __init__(self):
        self.raised = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------- the run
def train(cfg: RunConfig, *, out: Path | None = None, resume: Path | None = None, overwrite: bool = False,
          console=None, stop: StopFlag | None = None) -> dict[str, Any]:
    """Train per `cfg` into a run folder; returns the summary (also written to summary.json).

    `stop` is polled between steps; by default it is raised by SIGTERM/SIGINT.
    """
    env = distributed.setup()
    try:
        with stop or StopFlag() as stop:
            return _train(cfg, out, resume, overwrite, env, stop, console)
    finally:
        distributed.teardown()


def _train(cfg, out, resume, overwrite, env, stop, console) -> dict[str, Any]:
    # --- run folder: new (refusing to clobber) or resumed ------------------------------------------------
    run_dir, problem = resume, None
    if resume is None and env.is_main:
        try:
            run_dir = prepare_run_dir(cfg, out, overwrite)
        except TntError as err:
            problem = str(err)
    run_dir, problem = distributed.broadcast_object((run_dir, problem), env)  # rank 0 chose; all ranks agree
    if problem:
        raise TntError(problem)
    state = load_verified(run_dir / "last.pt")[0] if resume is not None else None
    if env.is_main:
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    reporter = Reporter(console, enabled=env.is_main)

    # --- data ---------------------------------------------------------------------------------------------
    spec = get_spec(cfg.model.name)
    img_size = run_model_config(cfg).img_size
    seed_everything(cfg.train.seed)
    loaders = build_loaders(
        cfg.data.data, data_root=cfg.data.data_root, img_size=img_size, batch_size=cfg.data.batch_size,
        workers=cfg.data.workers, mean=tuple(cfg.data.mean or spec.mean), std=tuple(cfg.data.std or spec.std),
        crop_pct=cfg.data.crop_pct or spec.crop_pct, interpolation=spec.interpolation,
        aug=cfg.aug if cfg.data.augment else None,
        distributed=env.enabled, repeated_aug=cfg.train.repeated_aug if env.enabled else 1, device=env.device,
        seed=cfg.train.seed, drop_last=True, max_train_images=cfg.data.max_train_images,
        strict=cfg.data.strict)
    try:
        return _run(cfg, run_dir, state, loaders, img_size, env, stop, reporter)
    finally:
        loaders.close()


def _run(cfg, run_dir, state, loaders, img_size, env, stop, reporter) -> dict[str, Any]:
    # --- model (+ EMA), optionally from a pretrained checkpoint ------------------------------------------------
    model_cfg = run_model_config(cfg, loaders.num_classes)
    model = build_model(model_cfg)
    if cfg.model.pretrained and state is None:
        load_pretrained(model, cfg.model.pretrained, name=cfg.model.name, reset_head=True)
    if cfg.model.freeze_backbone:                         # linear probe; set again on resume (not in the state)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))
    params_m = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    gmacs = _count_gmacs(model_cfg) if env.is_main else float("nan")
    model.to(env.device)
    seed_everything(cfg.train.seed + env.rank)            # ranks share weights but not dropout masks
    ema = None
    if cfg.train.ema_decay:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
    net = model
    if env.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    if cfg.train.compile:
        net = torch.compile(net)

    # --- optimiser, schedule, precision ----------------------------------------------------------------------
    steps_per_epoch = _steps_per_epoch(loaders, cfg)
    global_batch = cfg.data.batch_size * env.world_size
    lr = cfg.optim.lr * global_batch / cfg.optim.lr_ref_batch
    groups = param_groups(model, cfg.optim.weight_decay, lr=lr, layer_decay=cfg.optim.layer_decay,
                          backbone_lr_scale=cfg.optim.backbone_lr_scale)
    opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    sched = build_scheduler(opt, cfg, lr, steps_per_epoch)
    dtype = amp_dtype(cfg.train.amp, env.device)
    scaler = torch.amp.GradScaler(env.device.type, enabled=dtype == torch.float16)
    autocast = (lambda: torch.autocast(env.device.type, dtype=dtype)) if dtype else nullcontext

    # --- restore -------------------------------------------------------------------------------------------------
    history: list[dict[str, Any]] = []
    start_epoch, skip_steps, best = 0, 0, {"top1": -1.0, "epoch": None, "source": None}
    if state is not None:
        model.load_state_dict(state["model"])
        if ema is not None and state.get("ema_state") is not None:
            ema.load_state_dict(state["ema_state"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        history, best = state["history"], state["best"]
        start_epoch, skip_steps = state["epoch"], state["step_in_epoch"]
        set_rng_state(state["rng"][env.rank] if isinstance(state["rng"], list) else state["rng"])
        reporter.log(f"resumed {run_dir} at epoch {start_epoch + 1}" + (f", step {skip_steps}" if skip_steps else ""))

    def checkpoint(epoch: int, step_in_epoch: int, progress: dict[str, float] | None = None) -> None:
        rngs = _gather_rng(env)
        if not env.is_main:
            return
        record = model_record(model, cfg.model.name, ema.module if ema is not None else None)
        record.update(optimizer=opt.state_dict(), scheduler=sched.state_dict(), scaler=scaler.state_dict(),
                      ema_state=ema.state_dict() if ema is not None else None, epoch=epoch,
                      step_in_epoch=step_in_epoch, epoch_progress=progress, rng=rngs, history=history, best=best,
                      run_config=cfg.to_dict())
        save_verified(record, run_dir / "last.pt")

    def write_summary(status: str, **extra: Any) -> dict[str, Any]:
        last = history[-1] if history else {}
        summary = {"model": cfg.model.name, "epochs": cfg.train.epochs, "epochs_done": len(history),
                   "best_top1": best["top1"] if best["epoch"] is not None else None, "best_epoch": best["epoch"],
                   "best_source": best["source"], "final_top1": last.get("val_top1"),
                   "final_top5": last.get("val_top5"), "final_ema_top1": last.get("ema_top1"),
                   "params_m": round(params_m, 4), "gmacs": round(gmacs, 4), "img_size": img_size,
                   "num_classes": loaders.num_classes, "data": cfg.data.data, "status": status,
                   "seconds": round(sum(r["seconds"] for r in history), 2), "device": _device_name(env),
                   "world_size": env.world_size, "torch": torch.__version__, **extra}
        if env.is_main:
            atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        return summary

    # --- epochs ----------------------------------------------------------------------------------------------------
    ls = cfg.aug.label_smoothing
    for epoch in range(start_epoch, cfg.train.epochs):
        loaders.set_epoch(epoch)
        loaders.batch_augment.set_epoch(epoch, skip_steps)   # resumed mid-epoch: its draws continue from there
        net.train()
        done = state["epoch_progress"] if skip_steps else {"loss_sum": 0.0, "steps": 0, "seen": 0, "seconds": 0.0}
        loss_sum, steps, seen = done["loss_sum"], done["steps"], done["seen"]
        t0 = time.perf_counter() - done["seconds"]
        with reporter.epoch(epoch, cfg.train.epochs, steps_per_epoch) as bar:
            for step, (images, labels) in enumerate(loaders.train.epoch(steps_per_epoch)):
                if step < skip_steps:                      # resumed mid-epoch: these batches were trained on
                    continue
                images, targets = loaders.batch_augment(images, labels)
                with autocast():
                    logits = net(images)
                loss = F.cross_entropy(logits.float(), targets, label_smoothing=ls)
                if not _all_finite(loss, env):
                    where = f"epoch {epoch + 1} step {step + 1}"
                    if cfg.train.nan_policy == "skip":
                        reporter.log(f"non-finite loss at {where}: step skipped")
                        opt.zero_grad(set_to_none=True)
                        continue
                    write_summary("failed: non-finite loss")
                    raise TntError(f"non-finite loss at {where}; stopped, the last good checkpoint is "
                                   f"{run_dir / 'last.pt'} (lower optim.lr, set optim.clip_grad, or "
                                   "train.nan_policy=skip)")
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.optim.clip_grad:
                    scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
                scaler.step(opt)
                scaler.update()
                sched.step()
                if ema is not None:
                    ema.update_parameters(model)
                steps += 1
                seen += images.shape[0] * env.world_size
                loss_value = loss.item()                   # one device sync per step
                loss_sum += loss_value
                bar.update(loss=loss_value, lr=opt.param_groups[0]["lr"],
                           img_per_s=seen / (time.perf_counter() - t0))
                every = cfg.train.checkpoint_every_steps
                stopping = distributed.broadcast_flag(stop.raised, env)
                if stopping or (every and (step + 1) % every == 0):
                    checkpoint(epoch, step + 1, {"loss_sum": loss_sum, "steps": steps, "seen": seen,
                                                 "seconds": time.perf_counter() - t0})
                if stopping:
                    write_summary("interrupted")
                    raise Preempted(f"stopped by signal at epoch {epoch + 1} step {step + 1}, checkpoint saved; "
                                    f"continue with: tnt train --resume {run_dir}")
        skip_steps = 0
        seconds = time.perf_counter() - t0
        train_loss = distributed.all_reduce_sum([loss_sum, steps], env)
        row = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
               "train_loss": train_loss[0] / max(train_loss[1], 1), "img_per_s": seen / seconds,
               "seconds": seconds, "val_loss": None, "val_top1": None, "val_top5": None, "ema_top1": None}
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            val = evaluate(net, loaders.val, env=env, autocast=autocast)
            row.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"])
            candidates = [("model", val["top1"], model)]
            if ema is not None:
                row["ema_top1"] = evaluate(ema.module, loaders.val, env=env, autocast=autocast)["top1"]
                candidates.append(("ema", row["ema_top1"], ema.module))
            source, top1, weights = max(candidates, key=lambda c: c[1])
            if top1 > best["top1"]:
                best = {"top1": top1, "epoch": epoch + 1, "source": source}
                if env.is_main:
                    record = model_record(weights, cfg.model.name)
                    record["best"] = best
                    save_verified(record, run_dir / "best.pt", keep_previous=False)
        history.append(row)
        checkpoint(epoch + 1, 0)
        if env.is_main:
            atomic_write_text(run_dir / "metrics.csv", pd.DataFrame(history, columns=METRIC_COLUMNS).to_csv(index=False))
        reporter.epoch_done(row)
    summary = write_summary("completed", ranks_in_sync=_ranks_in_sync(model, env))
    if env.is_main:
        from tntcli.results import plot_training_curves

        plot_training_curves({run_dir.name: history}, run_dir / "curves")
    return summary


# ----------------------------------------------------------------------------------------------- helpers
def _steps_per_epoch(loaders, cfg: RunConfig) -> int:
    steps = len(loaders.train)
    if steps == 0:
        raise TntError(f"the train set ({loaders.n_train} images) is smaller than one batch of "
                       f"{cfg.data.batch_size}; lower data.batch_size")
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


def _all_finite(loss: torch.Tensor, env) -> bool:
    finite = bool(torch.isfinite(loss.detach()).item())
    return not distributed.broadcast_flag(not finite, env) if env.enabled else finite


def _gather_rng(env) -> Any:
    """RNG states of every rank (rank 0 saves them all, so each resumes its own stream)."""
    state = rng_state()
    if not env.enabled:
        return state
    states = [None] * env.world_size
    torch.distributed.all_gather_object(states, state)
    return states


def _ranks_in_sync(model: nn.Module, env) -> bool:
    """Whether every rank ends with bit-identical weights (DDP's promise, checked once at the end)."""
    if not env.enabled:
        return True
    with torch.no_grad():
        fingerprint = [float(p.double().sum()) for p in model.parameters()]
    everyone = [None] * env.world_size
    torch.distributed.all_gather_object(everyone, fingerprint)
    return all(f == everyone[0] for f in everyone)


def _count_gmacs(model_cfg) -> float:
    from tntcli.flops import count_macs

    with torch.no_grad():
        return count_macs(build_model(dataclasses.replace(model_cfg, drop_path_rate=0.0)), model_cfg.img_size).total() / 1e9


def _device_name(env) -> str:
    return torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
