"""`tnt ablate`: the paper's TNT ablations as variants of one base recipe, trained with the same seeds and data.

Each flag maps to architecture overrides (TNTConfig keys in `model.arch`) relative to the base model the recipe
builds, so a shrunk base (e.g. the quickstart's 8px patches) gets shrunk variants:
  --no-inner              inner_blocks=[]: no inner transformer (the word stem still builds the patch embeddings)
  --inner-blocks 1,4,8    inner transformer only in these blocks (1-based here, 0-based in the config); repeatable
  --no-word-pos           word_pos=false;   --no-sentence-pos: sentence_pos=false;   --no-pos: both false
  --inner-heads 1,2,4     one variant per head count (must divide the word dim)
  --words 4,16,64         words per patch: inner_stride = patch/sqrt(words), word_dim scaled so that
                          words x word_dim stays the base's; inner heads drop to a divisor of the new word dim
  --se                    SE module on the outer MLP
  --vs-deit               the DeiT of the base's width, depth, heads and patch size (TNT's outer transformer alone,
                          with DeiT's patch embedding), on the same data pipeline
A variant that resolves to the base architecture is the baseline itself and is folded into its row.

`--seeds 3` (or `--seeds 0,1,2`) trains every variant with each seed. Runs live in
<runs>/<model>-<variant>-s<seed>-<hash>, the hash covering the run's whole RunConfig: a run with the same config is
reused once finished and resumed (`train(resume=...)`) when interrupted, so a stopped ablation continues where it
stopped. The table gives each variant's mean and spread over seeds and its seed-paired difference to the baseline
with a 95% interval and a verdict (tntcli.stats).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from tntcli import stats
from tntcli.config import RunConfig, build_config, run_model_config
from tntcli.engine.runtime import count_gmacs, resolve_device, synchronize
from tntcli.engine.step import TrainStep, adamw
from tntcli.engine.train import train
from tntcli.errors import TntError
from tntcli.backends import apply_backend
from tntcli.flops import trainable_params
from tntcli.models.registry import build_model, get_spec
from tntcli.models.tnt import TNTConfig
from tntcli.paper import paper_figures, setting_gap
from tntcli.results import (atomic_write_text, data_label, folder_label, pyplot, relative_to_root, save_figure,
                            write_table)
from tntcli.runs import ABLATION_MARKER, read_run
from tntcli.seeds import config_digest, paired_correct, run_state, train_or_reuse, with_seed

FLAG_NAMES = ("--no-inner, --inner-blocks, --no-word-pos, --no-sentence-pos, --no-pos, --inner-heads, --words, "
              "--se or --vs-deit")
PAPER_SETTING = "TNT-S, ImageNet-1k, 224px, 300 epochs"


@dataclass
class AblationFlags:
    """The ablation flags of one `tnt ablate` call as typed (lists still comma-separated text)."""
    no_inner: bool = False
    inner_blocks: list[str] = field(default_factory=list)    # repeatable: one variant per list
    no_word_pos: bool = False
    no_sentence_pos: bool = False
    inner_heads: str | None = None
    words: str | None = None
    se: bool = False
    vs_deit: bool = False
    no_pos: bool = False

    def given(self) -> list[str]:
        """Flag parts of the results name, in a fixed order: `no-inner`, `inner-heads-1-2-4`..."""
        parts = ["no-inner"] if self.no_inner else []
        parts += [f"inner-blocks-{text}" for text in self.inner_blocks]
        parts += [name for name, on in (("no-word-pos", self.no_word_pos), ("no-sentence-pos", self.no_sentence_pos),
                                        ("no-pos", self.no_pos))
                  if on]
        parts += [f"{name}-{text}" for name, text in (("inner-heads", self.inner_heads), ("words", self.words)) if text]
        parts += ["se"] if self.se else []
        parts += ["vs-deit"] if self.vs_deit else []
        return [p.replace(",", "-").replace(" ", "") for p in parts]


@dataclass
class Variant:
    name: str                                 # table label: baseline, no-inner, inner-heads=2, words=64...
    description: str
    arch: dict[str, Any]                      # overrides on top of the base recipe's model.arch
    paper: tuple[str, str] | None             # (ablation, row) of paper.json; None: the paper has no figure
    cfg: RunConfig | None = None
    same_as: list[str] = field(default_factory=list)   # variants that resolved to this very architecture
    model: str | None = None                  # another model than the base's (the DeiT comparison)

    @property
    def slug(self) -> str:
        return self.name.replace("=", "-").replace(",", "-")


# ----------------------------------------------------------------------------------------------- flags -> variants
def _ints(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise TntError(f"{flag} expects comma-separated whole numbers (e.g. {flag} 1,2,4), got '{text}'") from None
    if len(set(values)) != len(values):
        raise TntError(f"{flag} {text} lists a value twice")
    return values


model_cfg = run_model_config        # the model a variant's RunConfig builds, as the engine builds it


def _base_text(name: str, c: TNTConfig) -> str:
    blocks = "all blocks" if c.inner_blocks is None else f"inner blocks {[b + 1 for b in c.inner_blocks]}"
    return (f"{name} as the recipe builds it: depth {c.depth}, d={c.dim}, {c.patch_size}px patches of "
            f"{c.num_words} words (c={c.word_dim}, inner heads {c.inner_heads}), {blocks}")


def _inner_blocks(text: str, base: TNTConfig) -> Variant:
    blocks = sorted(_ints("--inner-blocks", text))
    for b in blocks:
        if not 1 <= b <= base.depth:
            raise TntError(f"--inner-blocks {b} is out of range: blocks are numbered 1 to {base.depth} (1-based)")
    listed = ",".join(map(str, blocks))
    paper_row = "1-12" if blocks == list(range(1, 13)) else listed
    return Variant(f"inner-blocks={listed}", f"inner transformer only in blocks {listed} of {base.depth}",
                   {"inner_blocks": [b - 1 for b in blocks]},
                   ("inner_blocks", paper_row) if base.depth == paper_figures()["ablations"]["inner_blocks"]["depth"]
                   else None)


def _inner_heads(heads: int, base: TNTConfig) -> Variant:
    if heads < 1 or base.word_dim % heads:
        raise TntError(f"--inner-heads {heads} does not divide the word dim {base.word_dim} "
                       "(the heads split each word evenly)")
    return Variant(f"inner-heads={heads}", f"{heads} inner heads of width {base.word_dim // heads}",
                   {"inner_heads": heads}, ("inner_heads", str(heads)))


def _words(words: int, base: TNTConfig) -> Variant:
    side = math.isqrt(max(words, 0))
    if words < 1 or side * side != words:
        raise TntError(f"--words {words} is not a square number (1, 4, 16, 64...): words tile each patch as a "
                       "square grid")
    if base.patch_size % side:
        raise TntError(f"--words {words} needs a {side}x{side} grid of words, which does not tile the "
                       f"{base.patch_size}px patch")
    total = base.num_words * base.word_dim
    if total % words:
        raise TntError(f"--words {words}: words x word dim must stay {total} (the base's {base.num_words} x "
                       f"{base.word_dim}), and {total}/{words} is not a whole word dim")
    dim = total // words
    heads = max(h for h in range(1, base.inner_heads + 1) if dim % h == 0)   # keep the base's heads if they fit
    note = "" if heads == base.inner_heads else f", inner heads {heads} ({base.inner_heads} does not divide c={dim})"
    return Variant(f"words={words}", f"{words} words per patch: inner stride {base.patch_size // side}, c={dim}{note}",
                   {"inner_stride": base.patch_size // side, "word_dim": dim, "inner_heads": heads},
                   ("words", str(words)))


def plan_variants(base: RunConfig, flags: AblationFlags) -> list[Variant]:
    """The baseline and one variant per flag (value), each with its resolved RunConfig. Bad input: TntError."""
    if get_spec(base.model.name).family != "tnt":
        raise TntError(f"{base.model.name} has no inner transformer: ablations apply to TNT models "
                       "(e.g. --model tnt-s)")
    if not flags.given():
        raise TntError(f"no ablation given: pass one or more of {FLAG_NAMES}")
    if flags.no_inner and flags.inner_heads:      # (with --inner-blocks it is the sweep's end: no block at all)
        raise TntError("--no-inner removes the inner transformer, so --inner-heads has nothing to vary; "
                       "run them in separate calls")
    c = model_cfg(base)
    variants = [Variant("baseline", _base_text(base.model.name, c), {}, ("baseline", ""))]
    if flags.no_inner:
        variants.append(Variant("no-inner", "no inner transformer in any block (the word stem still builds the "
                                "patch embeddings)", {"inner_blocks": []}, None))
    variants += [_inner_blocks(text, c) for text in flags.inner_blocks]
    pos = [("no-word-pos", "no word position encoding", {"word_pos": False}, "sentence_only", flags.no_word_pos),
           ("no-sentence-pos", "no sentence position encoding", {"sentence_pos": False}, "word_only",
            flags.no_sentence_pos),
           ("no-pos", "neither position encoding", {"word_pos": False, "sentence_pos": False}, "none",
            flags.no_pos)]
    variants += [Variant(name, text, arch, ("position_encoding", row)) for name, text, arch, row, on in pos if on]
    if flags.inner_heads:
        variants += [_inner_heads(h, c) for h in _ints("--inner-heads", flags.inner_heads)]
    if flags.words:
        variants += [_words(n, c) for n in _ints("--words", flags.words)]
    if flags.se:
        variants.append(Variant("se", "SE module (channel attention) on the outer MLP", {"se": True}, ("se", "se")))
    if flags.vs_deit:
        variants.append(_deit(base, c))
    return _resolve(base, variants)


def _deit(base: RunConfig, c: TNTConfig) -> Variant:
    """The same-size DeiT: the base's width, depth, heads, MLP ratio and patch size, on the base's data pipeline
    (normalisation and crop fixed to the base model's, so only the architecture differs)."""
    from tntcli.models.registry import model_config

    spec = get_spec(base.model.name)
    default = model_config(spec.baseline)
    arch = {k: getattr(c, k) for k in ("depth", "dim", "heads", "mlp_ratio", "patch_size")
            if getattr(c, k) != getattr(default, k)}       # only what differs, as a recipe would write it
    return Variant("deit", f"{spec.baseline} of the same width and depth: depth {c.depth}, d={c.dim}, {c.heads} "
                   f"heads, {c.patch_size}px patches, no inner transformer, DeiT's linear patch embedding",
                   arch, ("deit", spec.baseline), model=spec.baseline)


def _resolve(base: RunConfig, variants: list[Variant]) -> list[Variant]:
    """Attach each variant's RunConfig; fold variants that build the baseline's architecture into its row."""
    def canonical(c: TNTConfig) -> TNTConfig:        # inner_blocks None and "all blocks" are the same model
        return dataclasses.replace(c, inner_blocks=tuple(b for b in range(c.depth) if c.has_inner(b)))

    kept: list[Variant] = []
    for v in variants:
        if v.model is not None:                      # another model: its own arch, the base's data pipeline
            spec = get_spec(base.model.name)
            v.cfg = build_config(base.to_dict(), {
                "model.name": v.model, "model.arch": v.arch, "model.img_size": model_cfg(base).img_size,
                "data.mean": list(base.data.mean or spec.mean), "data.std": list(base.data.std or spec.std),
                "data.crop_pct": base.data.crop_pct or spec.crop_pct})
            kept.append(v)
            continue
        try:
            v.cfg = build_config(base.to_dict(), {"model.arch": {**base.model.arch, **v.arch}})
            resolved = canonical(model_cfg(v.cfg))
        except TntError as err:
            raise TntError(f"variant {v.name}: {err}") from None
        twin = next((k for k in kept if k.model is None and canonical(model_cfg(k.cfg)) == resolved), None)
        if twin is None:
            kept.append(v)
        else:
            twin.same_as.append(v.name)
    return kept


# ----------------------------------------------------------------------------------------------- runs
def run_dir(runs: Path, v: Variant, seed: int | None = None) -> Path:
    """The folder of one seed of a variant (default: the recipe's seed): an existing one with the same config hash
    (whatever its label), else <model>-<variant>-s<seed>-<hash>."""
    cfg = v.cfg if seed is None else with_seed(v.cfg, seed)
    digest = config_digest(cfg)
    existing = sorted(runs.glob(f"*-{digest}")) if runs.is_dir() else []
    return existing[0] if existing else runs / f"{cfg.model.name}-{v.slug}-s{cfg.train.seed}-{digest}"


def _mark(path: Path, v: Variant) -> None:
    """Record which variants a run stands for (tnt results keeps only ablation baselines in its comparison)."""
    marker = path / ABLATION_MARKER
    old = json.loads(marker.read_text()).get("variants", []) if marker.is_file() else []
    names = sorted({*old, v.name, *v.same_as})
    atomic_write_text(marker, json.dumps({"variants": names, "description": v.description,
                                          "arch_overrides": v.arch}, indent=2) + "\n")


def train_variants(variants: list[Variant], runs: Path, seeds: list[int] | None = None,
                   console=None) -> list[list[Path]]:
    """Train what is missing, seed after seed (every variant of seed 0 first, so an interrupted study already
    has complete pairs); returns each variant's run folders in seed order."""
    seeds = seeds or [variants[0].cfg.train.seed]
    dirs: list[list[Path]] = [[] for _ in variants]
    for seed in seeds:
        for v, bucket in zip(variants, dirs):
            path = run_dir(runs, v, seed)
            _log(console, f"[bold]{v.name}[/] seed {seed}:")
            train_or_reuse(with_seed(v.cfg, seed), path, train, console)
            _mark(path, v)
            bucket.append(path)
    return dirs


def _log(console, text: str) -> None:
    if console is not None:
        console.print(text)


# ----------------------------------------------------------------------------------------------- dry run
class StepTimer:
    """One variant's model, AdamW and a fixed random batch of the real input size, for timing train steps."""

    def __init__(self, cfg: RunConfig, num_classes: int):
        mc = model_cfg(cfg, num_classes)
        self.device = resolve_device("auto")
        torch.manual_seed(cfg.train.seed)
        self.gmacs = count_gmacs(mc)
        self.model = build_model(mc).to(self.device).train()
        apply_backend(self.model, cfg.train.backend, device=self.device, training=True,
                      batch_size=cfg.data.batch_size)
        self.params_m = trainable_params(self.model) / 1e6
        self.train_step = TrainStep(self.model, self.model, adamw(self.model.parameters(), self.device, lr=1e-4))
        self.images = torch.randn(cfg.data.batch_size, 3, mc.img_size, mc.img_size, device=self.device)
        self.labels = torch.randint(0, num_classes, (cfg.data.batch_size,), device=self.device)

    def step(self) -> float:
        """Seconds for one forward, backward and optimiser step."""
        start = time.perf_counter()
        self.train_step(self.images, self.labels)
        synchronize(self.device)
        return time.perf_counter() - start


def time_train_steps(cfgs: list[RunConfig], num_classes: int, steps: int = 3) -> list[dict[str, float]]:
    """Params, GMACs and the median seconds per train step of each config. Steps alternate between the
    variants, after one untimed warm-up step each, so a busy machine slows them alike. No data loading."""
    timers = [StepTimer(cfg, num_classes) for cfg in cfgs]
    for timer in timers:
        timer.step()
    seconds: list[list[float]] = [[] for _ in timers]
    for _ in range(steps):
        for timer, bucket in zip(timers, seconds):
            bucket.append(timer.step())
    return [{"params_m": t.params_m, "gmacs": t.gmacs, "step_s": float(pd.Series(s).median())}
            for t, s in zip(timers, seconds)]


def plan_table(variants: list[Variant], runs: Path, timing_steps: int = 3,
               seeds: list[int] | None = None) -> pd.DataFrame:
    """What `tnt ablate` would do: per variant params, GMACs, measured step time, the runs and epochs left over
    the seeds and the estimated train time (epochs left x steps per epoch x step time)."""
    from tntcli.data import resolve_source

    seeds = seeds or [variants[0].cfg.train.seed]
    base = variants[0].cfg
    source = resolve_source(base.data.data, base.data.data_root)
    n_train = len(source.train) if source.train is not None else None     # FFCV: unknown until opened
    if n_train is not None and base.data.max_train_images:
        n_train = min(n_train, base.data.max_train_images)
    rows = []
    timings = time_train_steps([v.cfg for v in variants], source.num_classes, timing_steps)
    for v, measured in zip(variants, timings):
        steps = None if n_train is None else n_train // v.cfg.data.batch_size
        if steps is not None and v.cfg.train.max_steps:
            steps = min(steps, v.cfg.train.max_steps)
        states, epochs_left = [], 0
        for seed in seeds:
            path = run_dir(runs, v, seed)
            state = run_state(path)
            states.append(state)
            if state != "done":
                epochs_left += v.cfg.train.epochs - ((read_run(path) or {}).get("epochs_done") or 0)
        minutes = None if steps is None else epochs_left * steps * measured["step_s"] / 60
        counts = {k: states.count(k) for k in ("done", "resume", "new") if states.count(k)}
        rows.append({"variant": v.name, "description": v.description,
                     "params_m": round(measured["params_m"], 4), "gmacs": round(measured["gmacs"], 4),
                     "step_ms": round(measured["step_s"] * 1e3, 1),
                     "img_per_s": round(v.cfg.data.batch_size / measured["step_s"], 1),
                     "seeds": len(seeds), "runs_left": len(seeds) - counts.get("done", 0),
                     "steps_per_epoch": steps, "epochs_left": epochs_left,
                     "est_minutes": None if minutes is None else round(minutes, 2),
                     "run": ", ".join(f"{n} {dict(done='reuse', resume='resume', new='new')[k]}"
                                      for k, n in counts.items())})
    return pd.DataFrame(rows)


def plan_summary(plan: pd.DataFrame, timing_steps: int) -> str:
    total = plan.est_minutes.sum(min_count=1)
    runs_left, epochs = int(plan.runs_left.sum()), int(plan.epochs_left.sum())
    cost = "unknown" if pd.isna(total) else f"{total:.1f} min"
    return (f"plan: {runs_left} runs to train, {epochs} epochs in all; estimated training time {cost} "
            f"(sum over variants of epochs left x steps per epoch x measured step time: median of {timing_steps} "
            "train steps per variant, alternating between variants after a warm-up, on random images of the real "
            "size; data loading and evaluation not included)")


# ----------------------------------------------------------------------------------------------- results
ABLATION_COLUMNS = ["variant", "description", "params_m", "gmacs", "img_per_s", "top1", "top1_mean", "top1_std",
                    "n_seeds", "delta_top1", "delta_ci95_low", "delta_ci95_high", "verdict", "delta_method",
                    "paper_top1", "paper_delta_top1", "paper_note", "epochs", "seeds", "status", "run_dir"]
SEED_COLUMNS = ["variant", "seed", "top1", "final_top1", "best_epoch", "epochs", "img_per_s", "seconds", "status",
                "run_dir"]


def paper_row(key: tuple[str, str] | None) -> dict[str, Any]:
    """The paper's figures for one ablation row ({} when the paper has none)."""
    if key is None:
        return {}
    if key[0] == "deit":
        return paper_figures()["models"].get(key[1], {})
    ablations = paper_figures()["ablations"]
    return ablations["baseline"] if key[0] == "baseline" else ablations[key[0]]["rows"].get(key[1], {})


def _r(value: float | None, digits: int = 2) -> float | None:
    return None if value is None or pd.isna(value) else round(float(value), digits)


def ablation_paper_gap(variants: list[Variant], base_record: dict[str, Any]) -> str | None:
    """None when the baseline ran in the paper's ablation setting (TNT-S as built, 224px, ImageNet-1k)."""
    base = variants[0].cfg
    return setting_gap(base.model.name, base.model.arch, model_cfg(base).img_size,
                       data_label(base.data.data), base_record.get("num_classes"))


def ablation_table(variants: list[Variant], dirs: list[list[Path]], runs: Path | None = None) -> pd.DataFrame:
    """One row per variant: mean/std of the seeds' best top-1, and against the baseline the seed-paired delta
    with its 95% interval and verdict. Paper figures only when the baseline ran in the paper's setting."""
    records = [[read_run(d) or {} for d in ds] for ds in dirs]
    top1 = [{r.get("seed", i): r.get("best_top1") for i, r in enumerate(rs) if r.get("best_top1") is not None}
            for rs in records]
    gap = ablation_paper_gap(variants, records[0][0] if records[0] else {})
    paper_base = paper_row(("baseline", ""))["top1"]
    rows = []
    for v, recs, ds, by_seed in zip(variants, records, dirs, top1):
        spread = stats.spread(list(by_seed.values()))
        if v is variants[0]:
            delta = stats.PairedDelta(0.0, float("nan"), float("nan"), spread.n, "the baseline")
            verdict = "baseline"
        else:
            delta = stats.paired_delta(by_seed, top1[0], paired_correct(ds[0], dirs[0][0]) if len(ds) == 1 else None)
            verdict = delta.verdict
        paper = paper_row(v.paper) if gap is None else {}
        speeds = pd.Series([r.get("img_per_s") for r in recs], dtype=float).dropna()
        statuses = [r.get("status", "missing") for r in recs]
        rows.append({"variant": v.name, "description": v.description + (
                         f" (= {', '.join(v.same_as)})" if v.same_as else ""),
                     "params_m": recs[0].get("params_m") if recs else None,
                     "gmacs": recs[0].get("gmacs") if recs else None,
                     "img_per_s": _r(speeds.median(), 1) if len(speeds) else None,
                     "top1": _r(spread.mean), "top1_mean": _r(spread.mean), "top1_std": _r(spread.std),
                     "n_seeds": spread.n, "delta_top1": _r(delta.delta), "delta_ci95_low": _r(delta.low),
                     "delta_ci95_high": _r(delta.high), "verdict": verdict, "delta_method": delta.method,
                     "paper_top1": paper.get("top1"),
                     "paper_delta_top1": None if "top1" not in paper else round(paper["top1"] - paper_base, 1),
                     "paper_note": gap if gap else ("" if paper else "the paper has no such row"),
                     "epochs": min((r.get("epochs_done") or 0 for r in recs), default=None),
                     "seeds": " ".join(str(s) for s in by_seed),
                     "status": statuses[0] if len(set(statuses)) == 1 else
                     f"{statuses.count('completed')}/{len(statuses)} completed",
                     "run_dir": ";".join(_run_label(d, runs) for d in ds)})
    df = pd.DataFrame(rows, columns=ABLATION_COLUMNS)
    return df.astype({"n_seeds": "Int64", "epochs": "Int64"})


def _run_label(path: Path, runs: Path | None) -> str:
    return str(path) if runs is None else relative_to_root(path, runs)


def seed_table(variants: list[Variant], dirs: list[list[Path]], runs: Path | None = None) -> pd.DataFrame:
    """One row per run: what the per-variant means and intervals were computed from."""
    rows = []
    for v, ds in zip(variants, dirs):
        for d in ds:
            r = read_run(d) or {}
            rows.append({"variant": v.name, "seed": r.get("seed"), "top1": r.get("best_top1"),
                         "final_top1": r.get("final_top1"), "best_epoch": r.get("best_epoch"),
                         "epochs": r.get("epochs_done"), "img_per_s": _r(r.get("img_per_s"), 1),
                         "seconds": r.get("seconds"), "status": r.get("status"), "run_dir": _run_label(d, runs)})
    return pd.DataFrame(rows, columns=SEED_COLUMNS)


def _setting_text(variants: list[Variant], df: pd.DataFrame) -> str:
    """`cifar10-5k, 32px, 30 epochs, 3 seeds`: how our runs were made, for plot panels."""
    cfg = variants[0].cfg
    seeds = int(df.n_seeds.max()) if df.n_seeds.notna().any() else 0
    return (f"{data_label(cfg.data.data)}, {model_cfg(cfg).img_size}px, {cfg.train.epochs} epochs, "
            f"{seeds} seed{'s' if seeds != 1 else ''}")


def _footnotes(variants: list[Variant], df: pd.DataFrame, recipe: str | None, runs: Path | None) -> list[str]:
    cfg = variants[0].cfg
    records = [read_run(d) or {} for ds in _dirs_of(df, runs) for d in ds]
    devices = sorted({str(r.get("device")) for r in records if r.get("device")})
    img_size = model_cfg(cfg).img_size
    ablations = paper_figures()["ablations"]
    recipe_label = Path(recipe).stem if recipe and ("/" in recipe or recipe.endswith(".yaml")) else recipe
    notes = [
        f"Ours: base `{cfg.model.name}` from recipe `{recipe_label or 'defaults'}` on `{data_label(cfg.data.data)}` "
        f"at {img_size}px, {cfg.train.epochs} epochs; every variant runs with the same recipe, data and seeds "
        f"(seeds column).",
        "top1 = top1_mean = mean over seeds of each run's best validation top-1 (summary.json best_top1, model or "
        "EMA weights); top1_std = sample standard deviation over seeds (ddof 1; empty for one seed).",
        "delta_top1 = mean over seeds of (variant - baseline) with the same seed; delta_ci95_low/high = its 95% "
        "interval: Student t over the seed-paired differences with 2+ seeds, or with one seed a paired bootstrap "
        "over validation images (val_predictions.csv of both runs; it covers which images were drawn, not the "
        "seed). verdict: better / worse when the interval excludes 0, otherwise within noise (delta_method says "
        "which interval).",
        "img_per_s = measured training throughput: median over seeds of each run's median over epochs of "
        f"metrics.csv img_per_s (data loading included) on {', '.join(devices) or 'the training device'}; a shared "
        "machine makes it noisy. The paper prints inference throughput only; it is not shown beside ours.",
        f"paper_* = the paper's ImageNet figures for the same ablation ({ablations['setting']}), shown only when "
        "the baseline ran in that setting; otherwise paper_note says why they are empty. Per-run figures: the "
        "matching `-seeds.csv`.",
        "run_dir: the runs' folders under the --runs folder, `;`-separated by seed.",
    ]
    if any(v.name == "no-inner" for v in variants):
        ref = ablations["inner_blocks"]["reference"]["deit-s"]
        notes.append(f"The paper has no TNT-S without inner transformer; its nearest reference is DeiT-S at "
                     f"{ref['top1']} top-1 ({PAPER_SETTING}).")
    return notes


def _dirs_of(df: pd.DataFrame, runs: Path | None) -> list[list[Path]]:
    return [[(runs / p) if runs is not None else Path(p) for p in str(cell).split(";")] for cell in df.run_dir]


def plot_ablation(df: pd.DataFrame, stem: Path, title: str, setting: str) -> list[Path]:
    """Ours on the left (top-1 mean ± std over seeds; delta vs baseline with its 95% interval); the paper's deltas
    on their own panel (another data set, size and schedule: never on our axes)."""
    plt = pyplot()
    paper = df.paper_delta_top1.astype(float) if df.paper_delta_top1.notna().any() else None
    fig, axes = plt.subplots(1, 3 if paper is not None else 2, figsize=(15 if paper is not None else 10.5, 4.2))
    x = list(range(len(df)))
    top1, std = df.top1_mean.astype(float), df.top1_std.astype(float).fillna(0)
    axes[0].errorbar(x, top1, yerr=std, fmt="o", capsize=4)
    axes[0].set_title(f"ours: top-1, mean ± std over seeds\n({setting})", fontsize=9)
    axes[0].set_ylabel("val top-1 (%)")
    delta = df.delta_top1.astype(float)
    low, high = df.delta_ci95_low.astype(float), df.delta_ci95_high.astype(float)
    err = [(delta - low).fillna(0).clip(lower=0), (high - delta).fillna(0).clip(lower=0)]
    colors = ["tab:gray" if v == "baseline" else {"better": "tab:green", "worse": "tab:red"}.get(v, "tab:blue")
              for v in df.verdict]
    axes[1].bar(x, delta.fillna(0), color=colors, yerr=err, capsize=4)
    axes[1].set_title(f"ours: delta top-1 vs baseline, 95% interval\n({setting})", fontsize=9)
    axes[1].set_ylabel("top-1 change vs baseline (points)")
    if paper is not None:
        axes[2].bar(x, paper.fillna(0), color="tab:purple")
        for i in x:
            if pd.isna(paper.iloc[i]):
                axes[2].annotate("n/a", (i, 0), ha="center", va="bottom", fontsize=7)
        axes[2].set_title(f"the paper: delta top-1 vs TNT-S\n({PAPER_SETTING}; one run each)", fontsize=9)
        axes[2].set_ylabel("top-1 change vs baseline (points)")
    for ax in axes:
        ax.set_xticks(x, df.variant, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    for ax in axes[1:]:
        ax.axhline(0, color="black", lw=0.8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    try:
        return save_figure(fig, stem)
    finally:
        plt.close(fig)


def plot_seed_curves(variants: list[Variant], dirs: list[list[Path]], stem: Path, setting: str) -> list[Path]:
    """Validation top-1 per epoch of every variant: the mean over seeds, the band their min..max."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for v, ds in zip(variants, dirs):
        frames = [pd.DataFrame((read_run(d) or {}).get("history", [])) for d in ds]
        frames = [f.dropna(subset=["val_top1"]).set_index("epoch").val_top1 for f in frames
                  if not f.empty and "val_top1" in f]
        if not frames:
            continue
        curves = pd.concat(frames, axis=1)
        line, = ax.plot(curves.index, curves.mean(axis=1), label=f"{v.name} ({curves.shape[1]} seeds)")
        ax.fill_between(curves.index, curves.min(axis=1), curves.max(axis=1), alpha=0.15, color=line.get_color())
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="epoch", ylabel="val top-1 (%)", title=f"validation top-1 per epoch: mean, band = min..max over "
           f"seeds\n({setting})")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    try:
        return save_figure(fig, stem)
    finally:
        plt.close(fig)


def write_ablation(variants: list[Variant], dirs: list[list[Path]], out: Path, name: str,
                   recipe: str | None = None, runs: Path | None = None) -> list[Path]:
    """<out>/ablation-<name>.md/.csv (per variant), -seeds.csv (per run), its plot and the validation curves."""
    df = ablation_table(variants, dirs, runs)
    title = f"Ablation {name}: {variants[0].cfg.model.name} variants over seeds"
    setting = _setting_text(variants, df)
    written = write_table(df, out, f"ablation-{name}", title, _footnotes(variants, df, recipe, runs))
    written.append(atomic_write_text(out / f"ablation-{name}-seeds.csv",
                                     seed_table(variants, dirs, runs).to_csv(index=False)))
    written += plot_ablation(df, out / f"ablation-{name}", title, setting)
    written += plot_seed_curves(variants, dirs, out / f"ablation-{name}-curves", setting)
    return written


def results_name(flags: AblationFlags, name: str | None) -> str:
    if name is not None:
        if not name or any(ch in name for ch in "/\\ ") or name.startswith("."):
            raise TntError(f"--name '{name}' must be a plain file name (no spaces or slashes)")
        return name
    return "_".join(flags.given())


def run(base: RunConfig, flags: AblationFlags, *, runs: Path, out: Path, name: str | None = None,
        dry_run: bool = False, timing_steps: int = 3, recipe: str | None = None, seeds: list[int] | None = None,
        console=None) -> pd.DataFrame:
    """Plan the variants, then print the plan (dry run) or train what is missing and write the results."""
    variants = plan_variants(base, flags)
    stem = results_name(flags, name)
    if dry_run:
        plan = plan_table(variants, runs, timing_steps, seeds)
        _log(console, plan.drop(columns=["description"]).to_string(index=False))
        _log(console, plan_summary(plan, timing_steps))
        return plan
    dirs = train_variants(variants, runs, seeds, console)
    written = write_ablation(variants, dirs, out, stem, recipe, runs)
    if console is not None:
        console.print((out / f"ablation-{stem}.md").read_text(), markup=False, highlight=False)
        console.print(f"wrote {', '.join(folder_label(p) for p in written)}")
    return ablation_table(variants, dirs, runs)
