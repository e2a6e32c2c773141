"""The ``retinanet-xla`` command line."""

import sys
from typing import Optional

import typer

from retinanet_xla import __version__
from retinanet_xla.data.coco import DatasetError
from retinanet_xla.data.commands import data_app

app = typer.Typer(
    name="retinanet-xla",
    help="Train, evaluate and export RetinaNet detectors on TPU (and CPU) with PyTorch/XLA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"retinanet-xla {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Train, evaluate and export RetinaNet detectors on TPU (and CPU) with PyTorch/XLA."""


app.add_typer(data_app, name="data")


def main() -> None:
    """Entry point: user mistakes end in one line on stderr and exit code 2, never a traceback."""
    try:
        app(standalone_mode=True)
    except DatasetError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
