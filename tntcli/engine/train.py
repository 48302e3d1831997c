"""The training loop, top to bottom: run folder -> data -> `setup` (model, optimiser, restore) -> for each epoch
`train_one_epoch` -> `evaluate_epoch` -> `save_checkpoint` -> `write_summary`.

Read it linearly; each part names the recipe knobs it uses (config.py holds their defaults and meaning). One step
is `engine.step.TrainStep`; between log steps (`train.log_every`) nothing is read back from the device.
Resume is exact: a checkpoint carries model, optimiser, scheduler, scaler, EMA, RNG state and position in the
epoch, and the data order and augmentation of an epoch depend only on (seed, epoch).
"""
from __future__ import annotations

import functools
import json
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch
from torch import nn

from tntcli.backends import apply_backend
from tntcli.config import RunConfig, build_config, dump_yaml, run_model_config
from tntcli.data import build_loaders
from tntcli.engine import distributed
from tntcli.engine.rng import rng_state, seed_everything, set_rng_state
from tntcli.engine.run_checkpoint import load_verified, save_verified
from tntcli.engine.evaluate import evaluate
from tntcli.engine.progress import Reporter
from tntcli.engine.runtime import amp_dtype, autocast, count_gmacs, device_name
from tntcli.engine.step import ModelEma, TrainStep, adamw
from tntcli.engine.schedule import build_scheduler, last_step_lr
from tntcli.errors import Preempted, TntError
from tntcli.models.weights import load_pretrained, model_record
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

    `stop` is polled between steps (every step in one process, at log and checkpoint steps across processes);
    by default it is raised by SIGTERM/SIGINT.
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
    if state is not None:
        check_world_size(state, env, run_dir)
    if env.is_main:
        atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg))
    reporter = Reporter(console, enabled=env.is_main)

    # --- data ---------------------------------------------------------------------------------------------
    spec = get_spec(cfg.model.name)
    img_size = run_model_config(cfg).img_size
    seed_everything(cfg.train.seed)
    repeated_aug = cfg.train.repeated_aug if env.enabled or cfg.train.repeated_aug_single_process else 1
    if cfg.train.repeated_aug > 1 and repeated_aug == 1 and cfg.data.augment:
        reporter.log(f"repeated augmentation (train.repeated_aug={cfg.train.repeated_aug}) is off: the run has one "
                     "process, as in DeiT; --set train.repeated_aug_single_process=true forces it")
    loaders = distributed.together(lambda: build_loaders(
        cfg.data.data, data_root=cfg.data.data_root, img_size=img_size, batch_size=cfg.data.batch_size,
        workers=cfg.data.workers, mean=tuple(cfg.data.mean or spec.mean), std=tuple(cfg.data.std or spec.std),
        crop_pct=cfg.data.crop_pct or spec.crop_pct, interpolation=spec.interpolation,
        aug=cfg.aug if cfg.data.augment else None,
        distributed=env.enabled, repeated_aug=repeated_aug, device=env.device,
        seed=cfg.train.seed, drop_last=True, max_train_images=cfg.data.max_train_images,
        strict=cfg.data.strict), env, "opening the data")
    try:
        run = setup(cfg, run_dir, state, loaders, env, reporter)
        return _epochs(run, stop)
    finally:
        loaders.close()


@dataclass
class Run:
    """What a run holds between its steps: settings, data, model, optimisation and the record so far."""
    cfg: RunConfig
    run_dir: Path
    env: distributed.DistEnv
    reporter: Reporter
    loaders: Any
    model: nn.Module                       # the plain model: checkpoints, clipping, EMA
    net: nn.Module                         # what is called: the model, or its DDP / compiled wrapper
    ema: ModelEma | None
    opt: torch.optim.Optimizer
    sched: Any
    scaler: torch.amp.GradScaler
    step: TrainStep
    autocast: Callable
    steps_per_epoch: int
    params_m: float
    gmacs: float
    backend: str                           # the speed paths applied to the model (tntcli/backends)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"top1": -1.0, "epoch": None, "source": None})
    start_epoch: int = 0
    skip_steps: int = 0                    # resumed mid-epoch: steps of start_epoch already trained
    resumed_progress: dict[str, float] | None = None


def setup(cfg: RunConfig, run_dir: Path, state: dict | None, loaders, env, reporter) -> Run:
    """Model (+ EMA, optionally from a pretrained checkpoint), optimiser, schedule, precision; restored from
    `state` when resuming."""
    model_cfg = run_model_config(cfg, loaders.num_classes)
    model, gmacs = distributed.together(lambda: _build_model(cfg, model_cfg, pretrained=state is None), env,
                                        "building the model")
    params_m = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    model.to(env.device)
    dtype = amp_dtype(cfg.train.amp, env.device)
    backend = apply_backend(model, cfg.train.backend, device=env.device, dtype=dtype, training=True,
                            batch_size=cfg.data.batch_size)
    seed_everything(cfg.train.seed + env.rank)            # ranks share weights but not dropout masks
    ema = ModelEma(model, cfg.train.ema_decay) if cfg.train.ema_decay else None
    net = model
    if env.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    if cfg.train.compile:
        net = torch.compile(net)

    # optimiser: the lr is given at batch optim.lr_ref_batch and scales linearly with the global batch
    steps_per_epoch = _steps_per_epoch(loaders, cfg)
    lr = cfg.optim.lr * cfg.data.batch_size * env.world_size / cfg.optim.lr_ref_batch
    groups = param_groups(model, cfg.optim.weight_decay, lr=lr, layer_decay=cfg.optim.layer_decay,
                          backbone_lr_scale=cfg.optim.backbone_lr_scale)
    opt = adamw(groups, env.device, lr=lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    sched = build_scheduler(opt, cfg, lr, steps_per_epoch)
    scaler = torch.amp.GradScaler(env.device.type, enabled=dtype == torch.float16)
    run_autocast = functools.partial(autocast, env.device, dtype)
    step = TrainStep(net, model, opt, autocast=run_autocast, label_smoothing=cfg.aug.label_smoothing, scaler=scaler,
                     clip_grad=cfg.optim.clip_grad, scheduler=sched, ema=ema,
                     skip_non_finite=cfg.train.nan_policy == "skip")
    run = Run(cfg, run_dir, env, reporter, loaders, model, net, ema, opt, sched, scaler, step, run_autocast,
              steps_per_epoch, params_m, gmacs, backend)
    if state is not None:
        restore(run, state)
    return run


def _build_model(cfg: RunConfig, model_cfg, pretrained: bool) -> tuple[nn.Module, float]:
    """The run's model on the CPU (from `model.pretrained` for a new run) and its GMACs per image. Every rank
    counts the GMACs, so a rank that cannot (no fvcore) fails together with the others (`distributed.together`)."""
    model = build_model(model_cfg)
    if cfg.model.pretrained and pretrained:
        load_pretrained(model, cfg.model.pretrained, name=cfg.model.name, reset_head=True)
    if cfg.model.freeze_backbone:                         # linear probe; set again on resume (not in the state)
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))
    return model, count_gmacs(model_cfg)


def check_world_size(state: dict[str, Any], env, run_dir: Path) -> None:
    """A run resumes exactly only with the number of processes that saved it: the lr (scaled by the global batch),
    the steps per epoch, each rank's data shard and random stream all depend on it."""
    rng = state["rng"]
    saved = state.get("world_size", len(rng) if isinstance(rng, list) else 1)
    if saved != env.world_size:
        how = "a single process (tnt train --resume ...)" if saved == 1 else \
            f"torchrun --nproc_per_node {saved} (or {saved} processes over several nodes)"
        raise TntError(f"{run_dir} was trained with {saved} process(es) and this resume has {env.world_size}: the "
                       "lr scaling, the steps per epoch, each process's data shard and random stream would not "
                       f"continue exactly; resume it with {how}, or start a new run from its weights "
                       f"(--set model.pretrained={run_dir / 'last.pt'})")


def restore(run: Run, state: dict[str, Any]) -> None:
    """Continue from a checkpoint exactly: weights, optimiser, schedule, scaler, EMA, record, RNG, position."""
    run.model.load_state_dict(state["model"])
    if run.ema is not None and state.get("ema_state") is not None:
        run.ema.load_state_dict(state["ema_state"])
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.history, run.best = state["history"], state["best"]
    run.start_epoch, run.skip_steps = state["epoch"], state["step_in_epoch"]
    run.resumed_progress = state["epoch_progress"]
    set_rng_state(state["rng"][run.env.rank] if isinstance(state["rng"], list) else state["rng"])
    run.reporter.log(f"resumed {run.run_dir} at epoch {run.start_epoch + 1}"
                     + (f", step {run.skip_steps}" if run.skip_steps else ""))


def _epochs(run: Run, stop: StopFlag) -> dict[str, Any]:
    """Train, evaluate, checkpoint and record each remaining epoch; then the summary and the curves."""
    cfg = run.cfg
    for epoch in range(run.start_epoch, cfg.train.epochs):
        row = train_one_epoch(run, epoch, stop)
        run.skip_steps = 0
        if (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs:
            evaluate_epoch(run, epoch, row)
        run.history.append(row)
        save_checkpoint(run, epoch + 1, 0)
        if run.env.is_main:
            atomic_write_text(run.run_dir / "metrics.csv",
                              pd.DataFrame(run.history, columns=METRIC_COLUMNS).to_csv(index=False))
        run.reporter.epoch_done(row)
    summary = write_summary(run, "completed", ranks_in_sync=_ranks_in_sync(run.model, run.env))
    if run.env.is_main:
        from tntcli.results import plot_training_curves

        plot_training_curves({run.run_dir.name: run.history}, run.run_dir / "curves")
    return summary


# ----------------------------------------------------------------------------------------------- one epoch
class Tally:
    """An epoch's running loss sum, step count and non-finite losses, kept on the device so that a step never
    waits for the host; `read` brings them over (one sync), at log and checkpoint steps and at the epoch end."""

    def __init__(self, device: torch.device, loss_sum: float = 0.0, steps: int = 0):
        self.loss_sum = torch.tensor(loss_sum, dtype=torch.float64, device=device)   # finite losses only
        self.steps = torch.tensor(steps, dtype=torch.int64, device=device)           # steps that updated
        self.first_bad = torch.tensor(-1, dtype=torch.int64, device=device)          # since the last read
        self.bad = torch.tensor(0, dtype=torch.int64, device=device)

    def add(self, loss: torch.Tensor, finite: torch.Tensor, step: int) -> None:
        self.loss_sum += torch.where(finite, loss.double(), 0.0)
        self.steps += finite
        self.first_bad = torch.where((self.first_bad < 0) & ~finite, step, self.first_bad)
        self.bad += ~finite

    def read(self, env) -> tuple[float, int, int | None, int]:
        """(loss sum, steps, first non-finite step or None, non-finite steps), over all ranks for the last two;
        the non-finite record restarts."""
        first_bad = torch.where(self.first_bad < 0, torch.iinfo(torch.int64).max, self.first_bad)
        bad = self.bad.clone()
        if env.enabled:
            torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
            torch.distributed.all_reduce(bad)
        loss_sum, steps, first, count = torch.stack([self.loss_sum, self.steps.double(), first_bad.double(),
                                                     bad.double()]).tolist()
        self.first_bad.fill_(-1)
        self.bad.zero_()
        return loss_sum, int(steps), None if count == 0 else int(first), int(count)


def train_one_epoch(run: Run, epoch: int, stop: StopFlag) -> dict[str, Any]:
    """One epoch of steps (from `run.skip_steps` when resumed mid-epoch); returns its metrics row (train part).

    Nothing is read back from the device between log steps (`train.log_every`): there the loss is logged and a
    non-finite loss is acted on (stop policy: raise, keeping the checkpoint on disk, which predates it)."""
    cfg, env, loaders = run.cfg, run.env, run.loaders
    loaders.set_epoch(epoch)
    loaders.batch_augment.set_epoch(epoch, run.skip_steps)   # resumed mid-epoch: its draws continue from there
    run.net.train()
    done = run.resumed_progress if run.skip_steps else {"loss_sum": 0.0, "steps": 0, "seen": 0, "seconds": 0.0}
    tally = Tally(env.device, done["loss_sum"], done["steps"])
    seen, logged = done["seen"], (done["loss_sum"], done["steps"])
    t0 = time.perf_counter() - done["seconds"]
    every, log_every = cfg.train.checkpoint_every_steps, cfg.train.log_every
    # the rate of the epoch's last step taken so far: a resume past every step of the epoch takes none here
    lr = last_step_lr(run.sched) if run.skip_steps else run.opt.param_groups[0]["lr"]

    with run.reporter.epoch(epoch, cfg.train.epochs, run.steps_per_epoch) as bar:
        # resumed mid-epoch: the loader passes over the batches already trained on without augmenting them
        batches = loaders.train.epoch(run.steps_per_epoch, skip=run.skip_steps)
        for step, (images, labels) in enumerate(batches, start=run.skip_steps):
            images, targets = loaders.batch_augment(images, labels)
            lr = run.opt.param_groups[0]["lr"]          # the rate this step uses (the scheduler steps after it)
            loss, finite = run.step(images, targets)
            tally.add(loss, finite, step)
            seen += images.shape[0] * env.world_size
            stats = {"img_per_s": seen / (time.perf_counter() - t0)}
            save_now = bool(every) and (step + 1) % every == 0
            log_now = (step + 1) % log_every == 0 or step + 1 == run.steps_per_epoch
            if env.enabled:                             # ranks agree on stopping where they meet anyway
                stopping = (log_now or save_now) and distributed.broadcast_flag(stop.raised, env)
            else:
                stopping = stop.raised
            if log_now or save_now or stopping:
                loss_sum, steps, _, _ = check(run, tally, epoch)
                if steps > logged[1]:
                    stats["loss"] = (loss_sum - logged[0]) / (steps - logged[1])   # mean since the last log
                logged = (loss_sum, steps)
                stats["lr"] = lr
            bar.update(**stats)
            if stopping or save_now:                    # the tally was just read above: no second read
                save_checkpoint(run, epoch, step + 1, {"loss_sum": loss_sum, "steps": steps, "seen": seen,
                                                        "seconds": time.perf_counter() - t0})
            if stopping:
                write_summary(run, "interrupted")
                distributed.barrier(env)      # no rank exits (and gets the others killed) before rank 0 has saved
                raise Preempted(f"stopped by signal at epoch {epoch + 1} step {step + 1}, checkpoint saved; "
                                f"continue with: tnt train --resume {run.run_dir}")
    seconds = time.perf_counter() - t0
    loss_sum, steps, _, _ = check(run, tally, epoch)
    loss_sum, steps = distributed.all_reduce_sum([loss_sum, steps], env)
    return {"epoch": epoch + 1, "lr": lr, "train_loss": loss_sum / max(steps, 1),
            "img_per_s": seen / seconds, "seconds": seconds, "val_loss": None, "val_top1": None, "val_top5": None,
            "ema_top1": None}


def check(run: Run, tally: Tally, epoch: int) -> tuple[float, int, int | None, int]:
    """Read the tally; act on non-finite losses since the last check: stop (the default) raises, naming the epoch
    and step of the first; skip logs how many steps were skipped (they changed nothing: see TrainStep)."""
    loss_sum, steps, first_bad, bad = tally.read(run.env)
    if first_bad is not None:
        where = f"epoch {epoch + 1} step {first_bad + 1}"
        if run.cfg.train.nan_policy == "skip":
            run.reporter.log(f"non-finite loss at {where}" + (f" and {bad - 1} later step(s)" if bad > 1 else "")
                             + ": skipped")
        else:
            write_summary(run, "failed: non-finite loss")
            raise TntError(f"non-finite loss at {where}; stopped, the last good checkpoint is "
                           f"{run.run_dir / 'last.pt'} (lower optim.lr, set optim.clip_grad, or "
                           "train.nan_policy=skip)")
    return loss_sum, steps, first_bad, bad


# ----------------------------------------------------------------------------------------------- evaluate, save
def evaluate_epoch(run: Run, epoch: int, row: dict[str, Any]) -> None:
    """Validation loss/top-1/top-5 of the model (and EMA top-1) into `row`; the best weights so far to best.pt."""
    env, loaders = run.env, run.loaders
    val = evaluate(run.net, loaders.val, env=env, autocast=run.autocast)
    row.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"])
    candidates = [("model", val["top1"], run.model)]
    if run.ema is not None:
        row["ema_top1"] = evaluate(run.ema.module, loaders.val, env=env, autocast=run.autocast)["top1"]
        candidates.append(("ema", row["ema_top1"], run.ema.module))
    source, top1, weights = max(candidates, key=lambda c: c[1])
    if top1 > run.best["top1"]:
        run.best = {"top1": top1, "epoch": epoch + 1, "source": source}
        if env.is_main:
            record = model_record(weights, run.cfg.model.name)
            record["best"] = run.best
            save_verified(record, run.run_dir / "best.pt", keep_previous=False)


def save_checkpoint(run: Run, epoch: int, step_in_epoch: int, progress: dict[str, float] | None = None) -> None:
    """last.pt: everything `restore` needs to continue exactly (RNG states of every rank included)."""
    rngs = _gather_rng(run.env)
    if not run.env.is_main:
        return
    ema = run.ema
    record = model_record(run.model, run.cfg.model.name, ema.module if ema is not None else None)
    record.update(optimizer=run.opt.state_dict(), scheduler=run.sched.state_dict(), scaler=run.scaler.state_dict(),
                  ema_state=ema.state_dict() if ema is not None else None, epoch=epoch,
                  step_in_epoch=step_in_epoch, epoch_progress=progress, rng=rngs, world_size=run.env.world_size,
                  history=run.history, best=run.best, run_config=run.cfg.to_dict())
    save_verified(record, run.run_dir / "last.pt")


def write_summary(run: Run, status: str, **extra: Any) -> dict[str, Any]:
    history, best, cfg = run.history, run.best, run.cfg
    last = history[-1] if history else {}
    summary = {"model": cfg.model.name, "epochs": cfg.train.epochs, "epochs_done": len(history),
               "best_top1": best["top1"] if best["epoch"] is not None else None, "best_epoch": best["epoch"],
               "best_source": best["source"], "final_top1": last.get("val_top1"),
               "final_top5": last.get("val_top5"), "final_ema_top1": last.get("ema_top1"),
               "params_m": round(run.params_m, 4), "gmacs": round(run.gmacs, 4), "img_size": run.model.cfg.img_size,
               "num_classes": run.loaders.num_classes, "data": cfg.data.data, "status": status,
               "seconds": round(sum(r["seconds"] for r in history), 2), "device": device_name(run.env.device),
               "backend": run.backend, "world_size": run.env.world_size, "torch": torch.__version__, **extra}
    if run.env.is_main:
        atomic_write_text(run.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------------------------- helpers
def _steps_per_epoch(loaders, cfg: RunConfig) -> int:
    steps = len(loaders.train)
    if steps == 0:
        raise TntError(f"the train set ({loaders.n_train} images) is smaller than one batch of "
                       f"{cfg.data.batch_size}; lower data.batch_size")
    return min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps


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
