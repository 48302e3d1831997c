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
        app(standalone_mode=False)
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
