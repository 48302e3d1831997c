"""The `tnt` command line: parse flags, load the recipe, call the library. Nothing else lives here.

Every command body is a few lines that hand over to a library module; user mistakes surface as `TntError`
and are printed by `main` as one line with exit code 2.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from tntcli.errors import TntError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Transformer in Transformer: train, evaluate, count FLOPs and ablate TNT vs DeiT.")
console = Console(width=None if sys.stdout.isatty() else 140)  # logs and pipes get the whole table


@app.callback()
def _root() -> None:
    """Transformer in Transformer: train, evaluate, count FLOPs and ablate TNT vs DeiT."""


# ----------------------------------------------------------------------------------------------- train
def _overrides(pairs: dict[str, object], sets: List[str]) -> dict[str, object]:
    """Flags that were given (not None) plus `--set section.key=value` pairs, as dotted recipe overrides."""
    from tntcli.config import parse_assignment

    out = {k: v for k, v in pairs.items() if v is not None}
    out.update(parse_assignment(s) for s in sets)
    return out


@app.command()
def train(
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="YAML recipe path or name under recipes/."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model name, e.g. tnt-s, deit-s."),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset: .beton, ImageFolder root, cifar10, digits..."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Folder for named datasets."),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1, help="Per process."),
    lr: Optional[float] = typer.Option(None, "--lr", help="At batch optim.lr_ref_batch (1024), scaled linearly."),
    img_size: Optional[int] = typer.Option(None, "--img-size", min=16),
    workers: Optional[int] = typer.Option(None, "--workers", min=0),
    seed: Optional[int] = typer.Option(None, "--seed"),
    amp: Optional[str] = typer.Option(None, "--amp", help="auto, bf16, fp16 or off."),
    compile_: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=1, help="Cap on steps per epoch."),
    sets: List[str] = typer.Option([], "--set", help="Any recipe key: --set optim.weight_decay=0.1 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default runs/<model>-<time>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder exactly."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder."),
):
    """Train a model with the paper's recipe (or a YAML recipe); flags override recipe keys."""
    from tntcli.config import build_config, load_recipe
    from tntcli.engine.train import EXIT_PREEMPTED, Preempted, resume_config
    from tntcli.engine.train import train as run_training

    overrides = _overrides({"model.name": model, "data.data": data, "data.data_root": data_root,
                            "train.epochs": epochs, "data.batch_size": batch_size, "optim.lr": lr,
                            "model.img_size": img_size, "data.workers": workers, "train.seed": seed,
                            "train.amp": amp, "train.compile": compile_, "train.max_steps": max_steps}, sets)
    if resume is not None:
        if recipe is not None or out is not None:
            raise TntError("--resume continues a run with its saved recipe; drop --recipe/--out")
        cfg = resume_config(resume, overrides)
    else:
        cfg = build_config(load_recipe(recipe), overrides)
    try:
        summary = run_training(cfg, out=out, resume=resume, overwrite=overwrite, console=console)
    except Preempted as stop:
        Console(stderr=True).print(str(stop), highlight=False)
        raise typer.Exit(EXIT_PREEMPTED)
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
    workers: int = typer.Option(2, "--workers", min=0),
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


def main() -> None:
    """Console entry point: user mistakes print one line and exit non-zero, never a traceback."""
    err_console = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        code = app(standalone_mode=False)      # non-standalone click returns typer.Exit's code instead of exiting
    except TntError as err:
        err_console.print(f"[bold red]error:[/] {err}")
        sys.exit(2)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("interrupted")
        sys.exit(130)
    except Exception as err:
        if hasattr(err, "format_message") and hasattr(err, "exit_code"):  # click usage errors (typer vendors click)
            err_console.print(f"[bold red]error:[/] {err.format_message()} (see `tnt --help`)")
            sys.exit(err.exit_code)
        raise


if __name__ == "__main__":
    main()
