"""`tnt ablate`: the paper's TNT ablations as variants of one base recipe, trained with the same seed and data.

Each flag maps to architecture overrides (TNTConfig keys in `model.arch`) relative to the base model the recipe
builds, so a shrunk base (e.g. the quickstart's 8px patches) gets shrunk variants:
  --no-inner              inner_blocks=[]: no inner transformer (the word stem still builds the patch embeddings)
  --inner-blocks 1,4,8    inner transformer only in these blocks (1-based here, 0-based in the config); repeatable
  --no-word-pos           word_pos=false;   --no-sentence-pos: sentence_pos=false (both flags: also neither)
  --inner-heads 1,2,4     one variant per head count (must divide the word dim)
  --words 4,16,64         words per patch: inner_stride = patch/sqrt(words), word_dim scaled so that
                          words x word_dim stays the base's; inner heads drop to a divisor of the new word dim
  --se                    SE module on the outer MLP
A variant that resolves to the base architecture is the baseline itself and is folded into its row.

Runs live in <runs>/<model>-<variant>-<hash>, the hash covering the variant's whole RunConfig: a run with the same
config is reused once finished and resumed (`train(resume=...)`) when interrupted, so a stopped ablation
continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from tntcli.config import RunConfig, build_config, run_model_config
from tntcli.engine.runtime import count_gmacs, resolve_device, synchronize
from tntcli.engine.step import TrainStep, adamw
from tntcli.engine.train import train
from tntcli.errors import TntError
from tntcli.backends import apply_backend
from tntcli.flops import trainable_params
from tntcli.models.registry import build_model, get_spec
from tntcli.models.tnt import TNTConfig
from tntcli.paper import paper_figures
from tntcli.results import (pyplot, atomic_write_text, draw_top1_vs_gmacs, plot_training_curves, save_figure,
                            write_table)
from tntcli.runs import ABLATION_MARKER, read_run

FLAG_NAMES = "--no-inner, --inner-blocks, --no-word-pos, --no-sentence-pos, --inner-heads, --words or --se"
PAPER_SETTING = "TNT-S, 224px, ImageNet"


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

    def given(self) -> list[str]:
        """Flag parts of the results name, in a fixed order: `no-inner`, `inner-heads-1-2-4`..."""
        parts = ["no-inner"] if self.no_inner else []
        parts += [f"inner-blocks-{text}" for text in self.inner_blocks]
        parts += [name for name, on in (("no-word-pos", self.no_word_pos), ("no-sentence-pos", self.no_sentence_pos))
                  if on]
        parts += [f"{name}-{text}" for name, text in (("inner-heads", self.inner_heads), ("words", self.words)) if text]
        parts += ["se"] if self.se else []
        return [p.replace(",", "-").replace(" ", "") for p in parts]


@dataclass
class Variant:
    name: str                                 # table label: baseline, no-inner, inner-heads=2, words=64...
    description: str
    arch: dict[str, Any]                      # overrides on top of the base recipe's model.arch
    paper: tuple[str, str] | None             # (ablation, row) of paper.json; None: the paper has no figure
    cfg: RunConfig | None = None
    same_as: list[str] = field(default_factory=list)   # variants that resolved to this very architecture

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
            flags.no_word_pos and flags.no_sentence_pos)]
    variants += [Variant(name, text, arch, ("position_encoding", row)) for name, text, arch, row, on in pos if on]
    if flags.inner_heads:
        variants += [_inner_heads(h, c) for h in _ints("--inner-heads", flags.inner_heads)]
    if flags.words:
        variants += [_words(n, c) for n in _ints("--words", flags.words)]
    if flags.se:
        variants.append(Variant("se", "SE module (channel attention) on the outer MLP", {"se": True}, ("se", "se")))
    return _resolve(base, variants)


def _resolve(base: RunConfig, variants: list[Variant]) -> list[Variant]:
    """Attach each variant's RunConfig; fold variants that build the baseline's architecture into its row."""
    def canonical(c: TNTConfig) -> TNTConfig:        # inner_blocks None and "all blocks" are the same model
        return dataclasses.replace(c, inner_blocks=tuple(b for b in range(c.depth) if c.has_inner(b)))

    kept: list[Variant] = []
    for v in variants:
        try:
            v.cfg = build_config(base.to_dict(), {"model.arch": {**base.model.arch, **v.arch}})
            resolved = canonical(model_cfg(v.cfg))
        except TntError as err:
            raise TntError(f"variant {v.name}: {err}") from None
        twin = next((k for k in kept if canonical(model_cfg(k.cfg)) == resolved), None)
        if twin is None:
            kept.append(v)
        else:
            twin.same_as.append(v.name)
    return kept


# ----------------------------------------------------------------------------------------------- runs
def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:10]


def run_dir(runs: Path, v: Variant) -> Path:
    """The folder of a variant's run: an existing one with the same config hash (whatever its label), else new."""
    digest = config_hash(v.cfg)
    existing = sorted(runs.glob(f"*-{digest}")) if runs.is_dir() else []
    return existing[0] if existing else runs / f"{v.cfg.model.name}-{v.slug}-{digest}"


def run_state(path: Path) -> str:
    """done (completed, or failed for good), resume (a checkpoint to continue from) or new."""
    summary = read_run(path)
    status = (summary or {}).get("status", "")
    if status == "completed" or status.startswith("failed"):
        return "done"
    return "resume" if (path / "last.pt").is_file() else "new"


def _mark(path: Path, v: Variant) -> None:
    """Record which variants a run stands for (tnt results keeps only ablation baselines in its comparison)."""
    marker = path / ABLATION_MARKER
    old = json.loads(marker.read_text()).get("variants", []) if marker.is_file() else []
    names = sorted({*old, v.name, *v.same_as})
    atomic_write_text(marker, json.dumps({"variants": names, "description": v.description,
                                          "arch_overrides": v.arch}, indent=2) + "\n")


def train_variants(variants: list[Variant], runs: Path, console=None) -> list[Path]:
    """Train what is missing, one variant after the other; returns the run folders in variant order."""
    dirs = []
    for v in variants:
        path = run_dir(runs, v)
        state = run_state(path)
        action = {"done": "reusing finished run", "resume": "resuming", "new": "training"}[state]
        _log(console, f"[bold]{v.name}[/]: {action} {path}")
        if state == "resume":
            train(v.cfg, resume=path, console=console)
        elif state == "new":
            train(v.cfg, out=path, overwrite=True, console=console)   # a folder without checkpoint holds nothing
        _mark(path, v)
        dirs.append(path)
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


def plan_table(variants: list[Variant], runs: Path, timing_steps: int = 3) -> pd.DataFrame:
    """What `tnt ablate` would do: per variant params, GMACs, measured step time and the estimated train time."""
    from tntcli.data import resolve_source

    base = variants[0].cfg
    source = resolve_source(base.data.data, base.data.data_root)
    n_train = len(source.train) if source.train is not None else None     # FFCV: unknown until opened
    if n_train is not None and base.data.max_train_images:
        n_train = min(n_train, base.data.max_train_images)
    rows = []
    timings = time_train_steps([v.cfg for v in variants], source.num_classes, timing_steps)
    for v, measured in zip(variants, timings):
        path = run_dir(runs, v)
        state = run_state(path)
        steps = None if n_train is None else n_train // v.cfg.data.batch_size
        if steps is not None and v.cfg.train.max_steps:
            steps = min(steps, v.cfg.train.max_steps)
        epochs_left = 0 if state == "done" else v.cfg.train.epochs - ((read_run(path) or {}).get("epochs_done") or 0)
        minutes = None if steps is None else epochs_left * steps * measured["step_s"] / 60
        rows.append({"variant": v.name, "description": v.description,
                     "params_m": round(measured["params_m"], 4), "gmacs": round(measured["gmacs"], 4),
                     "step_ms": round(measured["step_s"] * 1e3, 1),
                     "img_per_s": round(v.cfg.data.batch_size / measured["step_s"], 1),
                     "epochs_left": epochs_left, "est_minutes": None if minutes is None else round(minutes, 2),
                     "run": f"{dict(done='reuse', resume='resume', new='new')[state]} {path}"})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------- results
ABLATION_COLUMNS = ["variant", "description", "params_m", "gmacs", "img_per_s", "top1", "delta_top1", "paper_top1",
                    "paper_delta_top1", "paper_img_per_s", "epochs", "status", "run_dir"]


def paper_row(key: tuple[str, str] | None) -> dict[str, Any]:
    """The paper's figures for one ablation row ({} when the paper has none)."""
    if key is None:
        return {}
    ablations = paper_figures()["ablations"]
    return ablations["baseline"] if key[0] == "baseline" else ablations[key[0]]["rows"].get(key[1], {})


def ablation_table(variants: list[Variant], dirs: list[Path]) -> pd.DataFrame:
    records = [read_run(d) or {} for d in dirs]
    base, paper_base = records[0].get("best_top1"), paper_row(("baseline", ""))["top1"]
    rows = []
    for v, rec, path in zip(variants, records, dirs):
        top1, paper = rec.get("best_top1"), paper_row(v.paper)
        rows.append({"variant": v.name, "description": v.description + (
                         f" (= {', '.join(v.same_as)})" if v.same_as else ""),
                     "params_m": rec.get("params_m"), "gmacs": rec.get("gmacs"),
                     "img_per_s": None if rec.get("img_per_s") is None else round(rec["img_per_s"], 1),
                     "top1": top1, "delta_top1": None if top1 is None or base is None else round(top1 - base, 2),
                     "paper_top1": paper.get("top1"),
                     "paper_delta_top1": None if "top1" not in paper else round(paper["top1"] - paper_base, 1),
                     "paper_img_per_s": paper.get("img_per_s"), "epochs": rec.get("epochs_done"),
                     "status": rec.get("status"), "run_dir": str(path)})
    return pd.DataFrame(rows, columns=ABLATION_COLUMNS)


def _footnotes(variants: list[Variant], df: pd.DataFrame, recipe: str | None) -> list[str]:
    cfg, records = variants[0].cfg, [read_run(d) or {} for d in df.run_dir]
    devices = sorted({str(r.get("device")) for r in records if r.get("device")})
    img_size = model_cfg(cfg).img_size
    ablations = paper_figures()["ablations"]
    sources = sorted({ablations[v.paper[0]]["table"] for v in variants if v.paper and v.paper[0] != "baseline"})
    notes = [
        f"Ours: base `{cfg.model.name}` from recipe `{recipe or 'defaults'}` on `{cfg.data.data}` at {img_size}px, "
        f"{cfg.train.epochs} epochs, seed {cfg.train.seed}; every variant uses the same recipe, seed and data.",
        "top1 = best validation top-1 of the run (summary.json best_top1, model or EMA weights); "
        "delta_top1 = variant minus baseline (ours).",
        "img_per_s = measured training throughput of the run: median over epochs of metrics.csv img_per_s (data "
        f"loading included) on {', '.join(devices) or 'the training device'}; a shared machine makes it noisy.",
        f"paper_* = the paper's figures for the same ablation of TNT-S ({ablations['setting']}), not ours; "
        "sources: " + "; ".join(sources or ["Sec. 3.2 (TNT on ImageNet)"]) + ".",
    ]
    if any(v.name == "no-inner" for v in variants):
        ref = ablations["inner_blocks"]["reference"]["deit-s"]
        notes.append(f"The paper has no TNT-S without inner transformer; its nearest reference is DeiT-S: "
                     f"{ref['top1']} top-1, {ref['img_per_s']} img/s (V100, the paper's figures).")
    return notes


def plot_ablation(df: pd.DataFrame, stem: Path, title: str) -> list[Path]:
    """Left: our top-1 vs GMACs per variant. Right: top-1 change vs baseline, ours beside the paper's (the paper
    prints no GMACs for its ablation variants, so its points cannot share the left axes)."""
    plt = pyplot()
    fig, (ax_pts, ax_delta) = plt.subplots(1, 2, figsize=(11, 4.2))
    draw_top1_vs_gmacs(ax_pts, {"ours": [(r.variant, r.gmacs, r.top1) for r in df.itertuples()]}, log_x=False)
    ax_pts.set_title("ours: top-1 vs GMACs", fontsize=10)
    x = range(len(df))
    for shift, column, label in ((-0.2, "delta_top1", "ours"), (0.2, "paper_delta_top1", f"paper ({PAPER_SETTING})")):
        values = df[column].astype(float)
        ax_delta.bar([i + shift for i in x], values.fillna(0), width=0.4, label=label)
        for i in x:
            if pd.isna(values.iloc[i]):
                ax_delta.annotate("n/a", (i + shift, 0), ha="center", va="bottom", fontsize=7)
    ax_delta.axhline(0, color="black", lw=0.8)
    ax_delta.set_xticks(list(x), df.variant, rotation=30, ha="right", fontsize=8)
    ax_delta.set_ylabel("top-1 change vs baseline (points)")
    ax_delta.set_title("delta top-1 vs baseline (n/a: no figure)", fontsize=10)
    ax_delta.legend(fontsize=8)
    ax_delta.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=11)
    try:
        return save_figure(fig, stem)
    finally:
        plt.close(fig)


def write_ablation(variants: list[Variant], dirs: list[Path], out: Path, name: str,
                   recipe: str | None = None) -> list[Path]:
    """results/ablation-<name>.md/.csv, its plot and the training curves of its runs."""
    df = ablation_table(variants, dirs)
    title = f"Ablation {name}: {variants[0].cfg.model.name} variants, ours beside the paper's"
    written = write_table(df, out, f"ablation-{name}", title, _footnotes(variants, df, recipe))
    written += plot_ablation(df, out / f"ablation-{name}", title)
    histories = {v.name: (read_run(d) or {}).get("history", []) for v, d in zip(variants, dirs)}
    written += plot_training_curves(histories, out / f"ablation-{name}-curves")
    return written


def results_name(flags: AblationFlags, name: str | None) -> str:
    if name is not None:
        if not name or any(ch in name for ch in "/\\ ") or name.startswith("."):
            raise TntError(f"--name '{name}' must be a plain file name (no spaces or slashes)")
        return name
    return "_".join(flags.given())


def run(base: RunConfig, flags: AblationFlags, *, runs: Path, out: Path, name: str | None = None,
        dry_run: bool = False, timing_steps: int = 3, recipe: str | None = None, console=None) -> pd.DataFrame:
    """Plan the variants, then print the plan (dry run) or train what is missing and write the results."""
    variants = plan_variants(base, flags)
    stem = results_name(flags, name)
    if dry_run:
        plan = plan_table(variants, runs, timing_steps)
        _log(console, plan.drop(columns=["description"]).to_string(index=False))
        total = plan.est_minutes.sum(min_count=1)
        _log(console, f"estimated training time: {'unknown' if pd.isna(total) else f'{total:.1f} min'} "
                      f"(median of {timing_steps} train steps per variant, alternating between variants after a "
                      "warm-up, on random images of the real size; data loading and evaluation not included)")
        return plan
    dirs = train_variants(variants, runs, console)
    written = write_ablation(variants, dirs, out, stem, recipe)
    if console is not None:
        console.print((out / f"ablation-{stem}.md").read_text(), markup=False, highlight=False)
        console.print(f"wrote {', '.join(str(p) for p in written)}")
    return ablation_table(variants, dirs)
