"""The ``retinanet-xla`` command line."""

from typing import Optional

import typer

from retinanet_xla import __version__

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
