"""The `tnt` command line: parse flags, load the recipe, call the library. Nothing else lives here.

Every command body is a few lines that hand over to a library module; user mistakes surface as `TntError`
and are printed by `main` as one line with exit code 2.
"""
from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from tntcli.errors import EXIT_PREEMPTED, Preempted, TntError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Transformer in Transformer: train, evaluate, count FLOPs and ablate TNT vs DeiT.")
console = Console(width=None if sys.stdout.isatty() else 140)  # logs and pipes get the whole table


@app.callback()
def _root() -> None:
    """Transformer in Transformer: train, evaluate, count FLOPs and ablate TNT vs DeiT."""


# ----------------------------------------------------------------------------------------------- run flags
RECIPE_PANEL = "Recipe keys (flags override the recipe; any key via --set section.key=value)"


def with_run_flags(command):
    """Give `command` one Typer option per command-line spelling declared for a recipe key (`config.py`).

    The command declares a `flags` parameter instead of the options; it receives the ones the user gave as
    dotted recipe overrides, e.g. `{"optim.lr": 0.002}`. Switches (`--amp/--no-amp`) are applied before value
    flags of the same key, so `--precision fp16 --amp` means fp16.
    """
    import functools
    import inspect
    import typing

    from tntcli.config import recipe_keys

    options = []                                       # (parameter name, dotted key, Flag)
    for key in recipe_keys():
        for flag in sorted(key.flags, key=lambda f: f.switch is None):     # switches first
            options.append((f"{key.key.replace('.', '__')}__{len(options)}", key, flag))
    signature = inspect.signature(command)
    hints = typing.get_type_hints(command)
    params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()
              if p.name != "flags"]
    for name, key, flag in options:
        kind = bool if flag.switch is not None else _option_type(key.type)
        option = typer.Option(None, *flag.names, help=f"{flag.help or key.help} ({key.key})", min=flag.min,
                              rich_help_panel=RECIPE_PANEL, show_default=False)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=Optional[kind]))

    @functools.wraps(command)
    def run(**kwargs):
        given = {}
        for name, key, flag in options:
            value = kwargs.pop(name)
            if value is not None:
                given[key.key] = flag.switch[0 if value else 1] if flag.switch is not None else value
        return command(**kwargs, flags=given)

    run.__signature__ = signature.replace(parameters=params)
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run


def _option_type(hint):
    """`int | None` -> int: the option's value type (None already means "not given")."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint


def _overrides(flags: dict[str, object], sets: List[str]) -> dict[str, object]:
    """Run flags that were given plus `--set section.key=value` pairs (which win), as dotted recipe overrides."""
    from tntcli.config import parse_assignment

    out = dict(flags)
    out.update(parse_assignment(s) for s in sets)
    return out


SETS_HELP = "Any recipe key: --set optim.weight_decay=0.1 (repeatable)."


# ----------------------------------------------------------------------------------------------- train
@app.command()
@with_run_flags
def train(
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="YAML recipe path or name under recipes/."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="N seeds from --seed, or a list 0,1,2: one run "
                                        "folder each (<out>/seed-<k>), finished ones reused."),
    sets: List[str] = typer.Option([], "--set", help=SETS_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "--output", "-o",
                                       help="Run folder (default runs/<model>-<time>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder exactly."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder."),
    flags: dict = None,
):
    """Train a model with the paper's recipe (or a YAML recipe); flags override recipe keys."""
    from tntcli.config import build_config, load_recipe
    from tntcli.engine.train import resume_config
    from tntcli.engine.train import train as run_training

    overrides = _overrides(flags, sets)
    if resume is not None:
        if recipe is not None or out is not None or seeds is not None:
            raise TntError("--resume continues a run with its saved recipe; drop --recipe/--out/--seeds")
        cfg = resume_config(resume, overrides)
    else:
        cfg = build_config(load_recipe(recipe), overrides)
    if seeds is not None:
        from tntcli import seeds as seeds_lib

        summaries = seeds_lib.train_seeds(cfg, _seed_list(seeds, flags.get("train.seed"), cfg.train.seed), out or Path("runs") / (
            f"{cfg.model.name}-seeds-{seeds_lib.config_digest(cfg, ignore_seed=True)}"), console=console)
        console.print(f"done: {seeds_lib.seeds_line(summaries)}")
        return
    summary = run_training(cfg, out=out, resume=resume, overwrite=overwrite, console=console)
    console.print(f"done: best top-1 {summary['best_top1']:.2f}% ({summary['best_source']}, epoch "
                  f"{summary['best_epoch']}), final top-1 {summary['final_top1']:.2f}%")


# ----------------------------------------------------------------------------------------------- eval
@app.command("eval")
def eval_(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Ours, official TNT or timm checkpoint."),
    data: str = typer.Option(..., "--data", help="Dataset with a val split (ImageFolder root, .beton, cifar10...)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Needed for foreign checkpoints."),
    data_root: Optional[str] = typer.Option(None, "--data-root"),
    ema: bool = typer.Option(False, "--ema", help="Evaluate the EMA weights of the checkpoint."),
    batch_size: int = typer.Option(128, "--batch-size", "-b", min=1),
    workers: int = typer.Option(2, "--workers", "-j", min=0),
    img_size: Optional[int] = typer.Option(None, "--img-size", min=16),
    crop_pct: Optional[float] = typer.Option(None, "--crop-pct", min=0.1, max=1.0),
    mean: Optional[str] = typer.Option(None, "--mean", help="Comma-separated, e.g. 0.485,0.456,0.406."),
    std: Optional[str] = typer.Option(None, "--std"),
    results: Path = typer.Option(Path("results"), "--results", help="Folder for eval.csv."),
    as_json: bool = typer.Option(False, "--json", help="Print the record as JSON on the last line."),
):
    """Evaluate a checkpoint: top-1, top-5, loss, images/s; appends a row to results/eval.csv."""
    import json

    from tntcli.engine.evaluate import run_eval
    from tntcli.engine.progress import Reporter

    record = run_eval(model_name=model, checkpoint=str(checkpoint), data=data, data_root=data_root, ema=ema,
                      batch_size=batch_size, workers=workers, img_size=img_size, crop_pct=crop_pct,
                      mean=_floats("--mean", mean), std=_floats("--std", std), results_dir=str(results),
                      reporter=Reporter(console, enabled=not as_json))
    if as_json:
        print(json.dumps(record))
    else:
        console.print(f"{record['model']}: top-1 {record['top1']:.2f}%  top-5 {record['top5']:.2f}%  "
                      f"loss {record['loss']:.4f}  {record['img_per_s']:.1f} img/s on {record['n_images']} images")
        from tntcli.paper import eval_beside_paper

        paper = eval_beside_paper(record["model"], data, record["img_size"], record["n_images"])
        if paper:
            console.print(paper)


def _seed_list(text: str, seed: Optional[int], first: int) -> List[int]:
    """--seeds N counts from the recipe's (or --seed's) seed; a --seeds list names the seeds itself."""
    from tntcli.seeds import parse_seeds

    if seed is not None and "," in text:
        raise TntError("give --seed with a --seeds count (seeds counted from it) or a --seeds list, not both")
    return parse_seeds(text, first)


def _floats(flag: str, text: Optional[str]) -> Optional[tuple[float, ...]]:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise TntError(f"{flag} expects three comma-separated numbers, got '{text}'") from None
    if len(values) != 3:
        raise TntError(f"{flag} expects three comma-separated numbers, got '{text}'")
    return values


# ----------------------------------------------------------------------------------------------- flops
@app.command()
def flops(
    model: List[str] = typer.Option([], "--model", "-m", help="Model name (repeatable), e.g. tnt-s."),
    all_models: bool = typer.Option(False, "--all", help="Every registered model."),
    img_size: int = typer.Option(224, "--img-size", help="Input resolution (multiple of the patch size)."),
    by_module: bool = typer.Option(False, "--by-module", help="Also print GMACs per top-level module."),
    out: Path = typer.Option(Path("results"), "--out", help="Folder for flops.md / flops.csv."),
):
    """Count parameters and GMACs (fvcore, attention included) and compare with the paper."""
    from tntcli import flops as flops_lib

    names = flops_lib.resolve_names(model, all_models)
    table = flops_lib.flops_table(names, img_size=img_size)
    flops_lib.print_table(table, console)
    if by_module:
        for name in names:
            flops_lib.print_by_module(name, img_size, console)
    written = flops_lib.write_flops(table, out)
    console.print(f"wrote {', '.join(str(p) for p in written)}")


# ----------------------------------------------------------------------------------------------- transfer
@app.command()
@with_run_flags
def transfer(
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", "-c", help="Weights: ours, official or timm."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Default: transfer/<data> for named datasets."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="N seeds from --seed, or a list 0,1,2: one run "
                                        "folder each (<out>/seed-<k>), finished ones reused."),
    sets: List[str] = typer.Option([], "--set", help=SETS_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "--output", "-o",
                                       help="Run folder (default runs/transfer-...)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder exactly."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder."),
    table: bool = typer.Option(False, "--table", help="Only write results/transfer.md|csv from runs under --runs."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Where --table looks for run folders."),
    results: Path = typer.Option(Path("runs/results"), "--results", help="Folder for transfer.md / transfer.csv "
                                 "(the committed table: results/, see results/README.md)."),
    flags: dict = None,
):
    """Fine-tune a pretrained TNT/DeiT on a downstream dataset: new head, resized position embedding (Table 9)."""
    from tntcli import transfer as transfer_lib

    if table:
        console.print(f"wrote {', '.join(str(p) for p in transfer_lib.write_transfer_table(runs, results))}")
        return
    overrides = _overrides(flags, sets)
    if seeds is not None:
        if resume is not None:
            raise TntError("--resume continues one run; drop --seeds (a rerun of the --seeds command resumes)")
        summaries = transfer_lib.run_transfer_seeds(checkpoint, _seed_list(seeds, flags.get("train.seed"), 0), recipe=recipe,
                                                    overrides=overrides, out=out, console=console)
        from tntcli.seeds import seeds_line

        console.print(f"done: {seeds_line(summaries)}")
        return
    summary = transfer_lib.run_transfer(checkpoint, recipe=recipe, overrides=overrides, out=out, resume=resume,
                                        overwrite=overwrite, console=console)
    console.print(transfer_lib.summary_line(summary))


# ----------------------------------------------------------------------------------------------- ablate, results
@app.command()
@with_run_flags
def ablate(
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Base recipe (YAML path or name)."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="N seeds from --seed, or a list 0,1,2: every variant "
                                        "with each; tables give mean, std and seed-paired 95% intervals."),
    sets: List[str] = typer.Option([], "--set", help=SETS_HELP),
    no_inner: bool = typer.Option(False, "--no-inner", help="Variant without inner transformer."),
    inner_blocks: List[str] = typer.Option([], "--inner-blocks", help="1-based blocks keeping the inner "
                                           "transformer, e.g. 1,4,8,12 (repeatable: one variant each)."),
    no_word_pos: bool = typer.Option(False, "--no-word-pos", help="Variant without word position encoding."),
    no_sentence_pos: bool = typer.Option(False, "--no-sentence-pos", help="Variant without sentence position "
                                         "encoding."),
    no_pos: bool = typer.Option(False, "--no-pos", help="Variant without either position encoding."),
    inner_heads: Optional[str] = typer.Option(None, "--inner-heads", help="Sweep of inner heads, e.g. 1,2,4,6,8."),
    words: Optional[str] = typer.Option(None, "--words", help="Sweep of words per patch, e.g. 4,16,64."),
    se: bool = typer.Option(False, "--se", help="Variant with the SE module."),
    vs_deit: bool = typer.Option(False, "--vs-deit", help="Also the DeiT of the base's width and depth."),
    name: Optional[str] = typer.Option(None, "--name", help="Results name (default: from the flags)."),
    runs: Path = typer.Option(Path("runs/ablate"), "--runs", help="Run folders; finished ones are reused."),
    out: Path = typer.Option(Path("runs/results"), "--out", help="Folder for ablation-<name>.md / .csv / plots "
                             "(committed studies: results/<study>, see results/README.md)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print variants, params, GMACs and estimated time only."),
    timing_steps: int = typer.Option(3, "--timing-steps", min=1, help="Timed train steps per variant (dry run)."),
    flags: dict = None,
):
    """Train the baseline and the paper's ablation variants under one recipe, seed and data; write a comparison."""
    from tntcli import ablate as ablate_lib
    from tntcli.config import build_config, load_recipe

    base = build_config(load_recipe(recipe), _overrides(flags, sets))
    seed_list = None if seeds is None else _seed_list(seeds, flags.get("train.seed"), base.train.seed)
    variants = ablate_lib.AblationFlags(no_inner, inner_blocks, no_word_pos, no_sentence_pos, inner_heads, words, se,
                                        vs_deit, no_pos)
    try:
        ablate_lib.run(base, variants, runs=runs, out=out, name=name, dry_run=dry_run, timing_steps=timing_steps,
                       recipe=recipe, seeds=seed_list, console=console)
    except Preempted as stop:
        raise Preempted(f"{stop}; or rerun the same `tnt ablate` command to resume") from None


@app.command("results")
def results_(
    runs: Path = typer.Option(Path("runs"), "--runs", help="Folder searched (at any depth) for run folders."),
    out: Path = typer.Option(Path("runs/results"), "--out", help="Folder for comparison.md / .csv / plots "
                             "(the committed ones: results/, see results/README.md)."),
):
    """Rebuild results/comparison.md|csv (TNT beside same-size DeiT, ours and the paper's) from run folders."""
    from tntcli.results import write_comparison

    console.print(f"wrote {', '.join(str(p) for p in write_comparison(runs, out))}")


# ----------------------------------------------------------------------------------------------- viz
@app.command()
def viz(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Ours, official TNT or timm checkpoint."),
    image: Path = typer.Option(..., "--image", "-i", help="An image file (JPEG, PNG...)."),
    out: Path = typer.Option(Path("runs/viz"), "--out", "-o", help="Folder for the PNGs."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Needed for foreign checkpoints."),
    blocks: Optional[str] = typer.Option(None, "--blocks", help="1-based blocks, e.g. 1,6,12 (default: first, "
                                         "middle, last)."),
    words: Optional[str] = typer.Option(None, "--words", help="Query words of the inner attention, 0-based "
                                        "row-major in a patch, e.g. 0,5 (default: first and centre)."),
    ema: bool = typer.Option(False, "--ema", help="The checkpoint's EMA weights."),
):
    """The paper's visualisations: patch/word embeddings, inner, patch-to-patch and class-token attention."""
    from tntcli.viz import visualize

    written = visualize(checkpoint, image, out, model_name=model, blocks=blocks, words=words, ema=ema)
    console.print(f"wrote {', '.join(str(p) for p in written)}")


# ------------------------------------------------------------------------------------------------ data
data_app = typer.Typer(no_args_is_help=True, help="Write FFCV .beton files and benchmark the loaders.")
app.add_typer(data_app, name="data")


@data_app.command("write")
def data_write(
    src: str = typer.Argument(..., help="Image folder (train/ + val/, or <class>/<image>), cifar10..., digits."),
    out: Path = typer.Argument(..., help="X.beton: writes X-train.beton + X-val.beton (or X.beton for one split)."),
    max_resolution: int = typer.Option(500, "--max-resolution", min=0,
                                       help="Longest side stored, as ffcv-imagenet (0: keep sizes)."),
    jpeg_quality: int = typer.Option(90, "--jpeg-quality"),
    compress_probability: float = typer.Option(0.5, "--compress-probability", help="JPEG share (proportion mode)."),
    write_mode: str = typer.Option("proportion", "--write-mode", help="proportion, jpg, raw or smart."),
    workers: int = typer.Option(2, "--workers"),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where named datasets live (./data)."),
    strict: bool = typer.Option(False, "--strict", help="Unreadable images are an error, not a skip."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace existing .beton files."),
):
    """Write an image dataset to FFCV .beton files (atomic; needs the ffcv extra)."""
    from tntcli.data.ffcv import write_beton

    for path in write_beton(src, out, max_resolution=max_resolution, jpeg_quality=jpeg_quality,
                            compress_probability=compress_probability, write_mode=write_mode,
                            num_workers=workers, data_root=data_root, strict=strict, overwrite=overwrite):
        console.print(f"wrote {path}")


@data_app.command("bench")
def data_bench(
    data: str = typer.Option(..., "--data", help="Source images, e.g. /tmp/cifar10-5k (a .beton is written)."),
    img_size: int = typer.Option(112, "--img-size"),
    batch_size: int = typer.Option(128, "--batch-size"),
    workers: int = typer.Option(2, "--workers"),
    repeats: int = typer.Option(3, "--repeats", help="Alternating timed rounds per loader."),
    epochs: int = typer.Option(1, "--epochs", help="Epochs per timed round."),
    rand_augment: Optional[bool] = typer.Option(None, "--rand-augment/--no-rand-augment",
                                                help="RandAugment in both (default: off; with --recipe, the "
                                                "recipe's, and --no-rand-augment drops it from the recipe)."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Use this recipe's full train augmentation "
                                         "(e.g. tnt-s-imagenet: RandAugment, erasing, MixUp/CutMix)."),
    device: str = typer.Option("cpu", "--device", help="Where batches go and are augmented: cpu, cuda, cuda:N."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Folder for the .beton (default: a temp folder)."),
    data_root: Optional[str] = typer.Option(None, "--data-root"),
    results: Path = typer.Option(Path("results"), "--results", help="Folder for data_bench.csv."),
):
    """images/s of the FFCV train loader vs the torchvision DataLoader on the same images."""
    from tntcli.data import bench

    result = bench.run_bench(data, data_root=data_root, img_size=img_size, batch_size=batch_size, workers=workers,
                             repeats=repeats, epochs=epochs, rand_augment=rand_augment, recipe=recipe,
                             device=device, cache_dir=cache)
    bench.print_result(result, console)
    console.print(f"appended {len(result.images_per_s)} rows to {bench.append_csv(result, results)}")


# ----------------------------------------------------------------------------------------------- bench
@app.command("bench")
def bench_(
    model: List[str] = typer.Option(["tnt-s"], "--model", "-m", help="Model name (repeatable)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16 (autocast)."),
    mode: str = typer.Option("both", "--mode", help="infer, train or both."),
    compile_: bool = typer.Option(False, "--compile/--no-compile", help="torch.compile every contestant."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch intra-op threads."),
    reps: int = typer.Option(5, "--reps", min=1, help="Timed repetitions per contestant (alternating)."),
    warmup: int = typer.Option(3, "--warmup", min=0, help="Untimed steps first: compilation happens here, and on "
                               "CPU glibc's heap needs a few training steps to stop page-faulting."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    vs: List[str] = typer.Option([], "--vs", help="'timm': also time timm's model with our weights; 'reference': "
                                 "also time our model with its fast paths off. Repeatable."),
    grad_ckpt: bool = typer.Option(False, "--grad-checkpointing", help="Activation checkpointing in training."),
    drop_path: float = typer.Option(0.1, "--drop-path", min=0.0, max=0.99, help="Stochastic depth of every "
                                    "contestant (the paper recipe's 0.1: what training compiles under)."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure peak memory of one extra step."),
    isolate: bool = typer.Option(False, "--isolate", help="Time every repetition in a fresh process per contestant "
                                 "(still alternating), so contestants do not share an allocator; slower."),
    results: Path = typer.Option(Path("results"), "--results", help="Folder for bench.csv."),
    depth: Optional[int] = typer.Option(None, "--depth", min=1, hidden=True, help="Reduced depth (tests)."),
    gemm_size: Optional[int] = typer.Option(None, "--gemm-size", min=16, hidden=True,
                                            help="Reference GEMM side (default 2048 on CPU, 8192 on GPU)."),
):
    """Throughput (img/s), peak memory and GEMM-relative efficiency of inference and training steps."""
    from tntcli import bench

    unknown = sorted(set(vs) - {"timm", "reference"})
    if unknown:
        raise TntError(f"--vs accepts 'timm' and 'reference', got '{unknown[0]}'")
    opts = bench.BenchOptions(models=list(dict.fromkeys(model)), batch_size=batch_size, precision=precision,
                              modes=bench.MODES if mode == "both" else (mode,), compile=compile_, threads=threads,
                              reps=reps, warmup=warmup, device=device, vs_timm="timm" in vs,
                              vs_reference="reference" in vs,
                              grad_checkpointing=grad_ckpt, drop_path=drop_path, measure_memory=memory, isolate=isolate,
                              gemm_size=gemm_size,
                              arch={} if depth is None else {"depth": depth})
    records = bench.run_bench(opts, console=console)
    bench.print_table(records, console)
    console.print(f"appended {len(records)} rows to {bench.append_csv(records, results)}")


def _print_tnt_warnings(err_console: Console) -> None:
    """`TntWarning`s as one `warning: ...` line each; every other warning as Python prints it."""
    import warnings

    from rich.text import Text

    from tntcli.errors import TntWarning

    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, TntWarning):
            err_console.print(Text.assemble(("warning: ", "bold yellow"), str(message)))
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main() -> None:
    """Console entry point: user mistakes print one line and exit non-zero, never a traceback."""
    err_console = Console(stderr=True, highlight=False, soft_wrap=True)
    _print_tnt_warnings(err_console)
    try:
        code = app(standalone_mode=False)      # non-standalone click returns typer.Exit's code instead of exiting
    except TntError as err:
        err_console.print(f"[bold red]error:[/] {err}")
        sys.exit(2)
    except Preempted as stop:                    # checkpoint saved: a cluster requeues on this exit code
        err_console.print(str(stop))
        sys.exit(EXIT_PREEMPTED)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except OSError as err:                           # --out on a file or a read-only place, a full disk: the
        what = f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err)   # system's words
        err_console.print(f"[bold red]error:[/] {escape(what)}")
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as err:
        if hasattr(err, "format_message") and hasattr(err, "exit_code"):  # click usage errors (typer vendors click)
            if err.format_message():                     # empty for `tnt` alone, which has printed the help
                err_console.print(f"[bold red]error:[/] {err.format_message()} (see `tnt --help`)")
            sys.exit(err.exit_code)
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
