"""The ``retinanet-xla`` command line."""

import json
import os
import sys
import time
from typing import List, Optional

import typer

from retinanet_xla import __version__, storage
from retinanet_xla.commands.data import data_app
from retinanet_xla.config import load_config
from retinanet_xla.errors import ConfigError, RunFailed, RunStopped, UserError
from retinanet_xla.logs import configure_logging

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


def set_help(example: str) -> str:
    return f"Override a config key (repeatable), e.g. {example}."


TRAIN_SET = set_help("--set train.steps=200 --set data.image_size=[512,512]")
BENCH_SET = set_help("--set train.batch_size=16 --set train.precision=fp32")
EVAL_SET = set_help("--set eval.score_threshold=0.01 --set eval.backend=faster-coco-eval")
PREDICT_SET = set_help("--set eval.nms_iou=0.6 --set eval.max_detections=50")
EXPORT_SET = set_help("--set eval.max_detections=50 --set eval.pre_nms_top_k=1000")
DEVICES_HELP = "Replicas to run, one per local device: a TPU chip, a GPU, an XLA device or a CPU process (runtime.num_devices; default: every device). 1 runs in this process."


def _with_devices(overrides: List[str], devices: Optional[int]) -> List[str]:
    """``--devices N`` as ``runtime.num_devices=N``: the schema checks it, in one line."""
    return [*overrides, f"runtime.num_devices={devices}"] if devices is not None else list(overrides)


PEAK_HELP = (
    "The device's peak TFLOP/s in the step's precision, for utilisation (runtime.peak_tflops; "
    "default: a table of datasheet peaks, or on a CPU a matmul measured in the same run)."
)


def _with_peak(overrides: List[str], peak_tflops: Optional[float]) -> List[str]:
    return [*overrides, f"runtime.peak_tflops={peak_tflops}"] if peak_tflops is not None else overrides


@app.command()
def train(
    config: str = typer.Argument(..., help="YAML config file (see configs/)."),
    overrides: List[str] = typer.Option([], "--set", help=TRAIN_SET),
    output: Optional[str] = typer.Option(None, "--output", help="Output directory (default: train.output_dir)."),
    resume: bool = typer.Option(
        True, "--resume/--no-resume", help="Continue from the newest valid checkpoint in the output directory."
    ),
    devices: Optional[int] = typer.Option(None, "--devices", help=DEVICES_HELP),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="With --no-resume: move an earlier run's checkpoints and logs aside (OUTPUT/replaced-TIME/) and start over.",
    ),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", min=0.001, help=PEAK_HELP),
) -> None:
    """Train a RetinaNet: one compiled step, checkpoints, logs and summary.json in the output directory.

    Resumes from the newest valid checkpoint in the output directory. SIGTERM/SIGINT saves a checkpoint at the next step and exits with code 75; the loss turning NaN exits with code 1.

    Example: retinanet-xla train configs/640-3x.yaml --output runs/640-3x --set train.steps=200"""
    from retinanet_xla.commands.train import train as run_training

    settings = load_config(config, _with_peak(_with_devices(overrides, devices), peak_tflops))
    if overwrite and resume:
        raise ConfigError("--overwrite starts over: it goes with --no-resume")
    summary = run_training(settings, storage.location(output or settings.train.output_dir), resume, overwrite)
    if summary is not None:  # None: a torchrun process other than the master
        typer.echo(json.dumps(summary, indent=2))


@app.command()
def bench(
    config: str = typer.Argument(..., help="YAML config file; its model, input size and batch are used."),
    steps: int = typer.Option(20, "--steps", min=2, help="Steps to run; the first one compiles."),
    overrides: List[str] = typer.Option([], "--set", help=BENCH_SET),
    json_output: Optional[str] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
    devices: Optional[int] = typer.Option(None, "--devices", help=DEVICES_HELP),
    input_pipeline: bool = typer.Option(
        False,
        "--input-pipeline",
        help="Feed the steps through the data pipeline (the config's train split, or synthetic images) and report how long the device waited for input.",
    ),
    trace_only: bool = typer.Option(
        False, "--trace-only", help="Only trace the step, never run it: the host's time to trace one step, alone (XLA)."
    ),
    peak_tflops: Optional[float] = typer.Option(None, "--peak-tflops", min=0.001, help=PEAK_HELP),
) -> None:
    """Time the training step on synthetic batches (no dataset), on every local XLA device as train would: compile time, step time, images/s.

    Example: retinanet-xla bench configs/640-3x.yaml --steps 50"""
    from retinanet_xla.commands.bench import benchmark

    settings = load_config(config, _with_peak(_with_devices(overrides, devices), peak_tflops))
    result = benchmark(settings, steps, input_pipeline, trace_only)
    if result is None:  # a torchrun process other than the master
        return
    if trace_only:
        typer.echo(
            f"{result['device']} x {result['replicas']} replica(s): tracing the step takes {result['trace_seconds'] * 1000:.1f} "
            f"+- {result['trace_seconds_spread'] * 1000:.1f} ms on the host (batch {result['batch_size']}, "
            f"{result['image_size'][0]}x{result['image_size'][1]}; traced {steps} times, never run)"
        )
    else:
        typer.echo(
            f"{result['device']} x {result['replicas']} replica(s): first step (compile) {result['first_step_seconds']:.1f} s, "
            f"step {result['step_seconds'] * 1000:.1f} ms (host {result['trace_seconds'] * 1000:.1f} "
            f"+- {result['trace_seconds_spread'] * 1000:.1f} ms per step, graph {result['step_graph']}), {result['images_per_second']:.1f} images/s "
            f"(batch {result['batch_size']}, {result['image_size'][0]}x{result['image_size'][1]}), "
            f"compilations {result['compilations_total']} ({result['compilations_after_warmup']} after warm-up), "
            f"waiting for input {result['device_wait_fraction']:.1%} of the time ({result['input']})"
        )
        typer.echo(utilisation_line(result))
    if json_output:
        storage.write_text(storage.location(json_output), json.dumps(result, indent=2) + "\n")


def utilisation_line(result: dict) -> str:
    """``0.55 TFLOP per image: 0.083 TFLOP/s per device, 51.2% of the peak 0.162 (measured: ...)``."""
    if result["train_flops_per_image"] is None:
        return "utilisation unknown: this model's FLOPs could not be counted"
    line = f"{result['train_flops_per_image'] / 1e12:.4g} TFLOP per training image: {result['achieved_tflops_per_device']:.4g} TFLOP/s per device"
    if result["utilisation"] is None:
        return f"{line}; utilisation unknown ({result['peak_source']})"
    return f"{line}, {result['utilisation']:.1%} of its peak {result['peak_tflops_per_device']:.4g} ({result['peak_source']})"


@app.command("eval")
def evaluate(
    checkpoint: str = typer.Argument(
        ..., help="A checkpoint .pt written by train, or a run directory (its newest valid checkpoint)."
    ),
    data: Optional[str] = typer.Option(None, "--data", help="COCO annotations to evaluate on (default: the config's val split)."),
    images: Optional[str] = typer.Option(None, "--images", help="Images directory for --data."),
    overrides: List[str] = typer.Option([], "--set", help=EVAL_SET),
    output: Optional[str] = typer.Option(
        None, "--output", help="Where detections.json and metrics.json go (default: RUN/eval/STEP)."
    ),
    devices: Optional[int] = typer.Option(None, "--devices", help=DEVICES_HELP),
) -> None:
    """COCO metrics of a checkpoint: the pycocotools summary, AP per category, detections.json.

    Example: retinanet-xla eval runs/640-3x --data coco/annotations/instances_val2017.json --images coco/val2017"""
    from rich.console import Console
    from rich.table import Table

    from retinanet_xla.commands.evaluate import evaluate_checkpoint

    if (data is None) != (images is None):
        raise ConfigError("--data and --images go together")
    metrics, output_dir = evaluate_checkpoint(checkpoint, _with_devices(overrides, devices), data, images, output)
    if metrics is None:  # a torchrun process other than the master
        return
    for line in metrics["summary"]:
        typer.echo(line)
    table = Table("category", "AP", title="AP per category")
    for name, value in metrics["per_category_AP"].items():
        table.add_row(name, f"{value:.3f}" if value >= 0 else "n/a")
    Console().print(table)
    typer.echo(f"wrote {storage.join(output_dir, 'detections.json')} and {storage.join(output_dir, 'metrics.json')}")


@app.command()
def predict(
    checkpoint: str = typer.Argument(..., help="A checkpoint .pt, or a run directory (its newest valid checkpoint)."),
    inputs: List[str] = typer.Argument(..., help="Images, or directories of JPEG/PNG images."),
    output: str = typer.Option(..., "--output", help="Directory for the drawn PNGs and detections.json."),
    score_threshold: float = typer.Option(
        0.3, "--score-threshold", min=0.0, max=1.0, help="Draw and keep detections at or above this score."
    ),
    overrides: List[str] = typer.Option([], "--set", help=PREDICT_SET),
    ground_truth: Optional[str] = typer.Option(
        None,
        "--ground-truth",
        help="A COCO file with these images' boxes: drawn on the left of each picture, detections on the right (matched by file name).",
    ),
) -> None:
    """Draw detections on images (PNG) and write them all to one JSON file.

    Example: retinanet-xla predict runs/demo runs/demo/synthetic/val --output runs/demo/predict"""
    from retinanet_xla.inference.loading import load_for_inference
    from retinanet_xla.inference.predict import predict as run_predict

    loaded = load_for_inference(checkpoint, overrides)
    done = run_predict(loaded, inputs, output, score_threshold, ground_truth)
    typer.echo(
        f"{done.images} image(s), {done.detections} detection(s) at score >= {score_threshold}, "
        f"{len(done.unreadable)} unreadable; wrote {done.json_path}"
    )
    if done.unreadable:  # everything readable was still written; the rest is the input's fault
        for problem in done.unreadable[:5]:
            typer.echo(f"error: unreadable image: {problem}", err=True)
        raise typer.Exit(ConfigError.exit_code)


@app.command()
def report(
    run: str = typer.Argument(..., help="A run directory written by train (local or gs://)."),
    score_threshold: float = typer.Option(
        0.3, "--score-threshold", min=0.0, max=1.0, help="Draw detections at or above this score."
    ),
) -> None:
    """Pictures of a run in RUN/report/: loss, learning rate, images/s and AP curves, validation images with ground truth beside detections, and one self-contained HTML page showing them (train writes it at the end).

    Example: retinanet-xla report runs/demo"""
    from retinanet_xla.inference.report import write_report

    typer.echo(f"wrote {write_report(run, score_threshold)}")


@app.command("export")
def export_command(
    checkpoint: str = typer.Argument(..., help="A checkpoint .pt, or a run directory (its newest valid checkpoint)."),
    fmt: str = typer.Option("onnx", "--format", help="onnx | torchscript | exported-program | stablehlo"),
    output: Optional[str] = typer.Option(
        None, "--output", help="Directory for the artefact and its JSON (default: RUN/export/STEP)."
    ),
    batch_size: int = typer.Option(1, "--batch-size", min=1, help="The fixed batch size of the exported graph."),
    float_input: bool = typer.Option(False, "--float-input", help="Take normalised float32 images instead of uint8 pixels."),
    overrides: List[str] = typer.Option([], "--set", help=EXPORT_SET),
    check: bool = typer.Option(
        False,
        "--check",
        help="Run the artefact on validation images and compare with the in-package model (exit 1 if they differ).",
    ),
) -> None:
    """Write the detector for serving: fixed-size outputs with NMS in the graph (StableHLO: the fixed-size candidates), and a JSON with the input size, normalisation and categories.

    Example: retinanet-xla export runs/demo --format onnx --check"""
    from retinanet_xla.export.formats import check_passes
    from retinanet_xla.export.run import export_checkpoint

    exported, report = export_checkpoint(checkpoint, fmt, output, batch_size, not float_input, overrides, check)
    typer.echo(
        f"wrote {exported.path} and {exported.metadata}"
        + ("" if exported.with_nms else " (candidates only: NMS is left to the caller)")
    )
    if report is not None:
        typer.echo(
            f"check on {report['images']} validation image(s): {report['count_mismatches']} count and {report['label_mismatches']} label mismatches, "
            f"boxes within {report['max_box_relative_difference']:.2e} relative, scores within {report['max_score_difference']:.2e}"
        )
        if not check_passes(report):
            typer.echo("error: the exported model does not match the in-package model", err=True)
            raise typer.Exit(1)


app.add_typer(data_app, name="data")


OTHER_RANKS_WAIT_SECONDS = 10.0  # far more than rank 0 needs to print and exit


def _check_set_arguments(argv: List[str]) -> None:
    """``--set key value`` (a space for the ``=``) would reach typer as an extra argument, whose
    message does not say what ``--set`` wants: say it here."""
    for index, argument in enumerate(argv[:-1]):
        value = argv[index + 1]
        if argument == "--set" and "=" not in value:
            following = argv[index + 2] if index + 2 < len(argv) else None
            hint = f" (--set {value}={following}?)" if following is not None and not following.startswith("-") else ""
            raise ConfigError(f"--set {value}: expected key=value{hint}")


def main() -> None:
    """Entry point: every way a command ends maps to the exit code of its kind (errors.py); user
    mistakes end in one line on stderr, never a traceback."""
    configure_logging()
    try:
        _check_set_arguments(sys.argv[1:])
        app(standalone_mode=True)
    except RunStopped as stop:  # its message says how to resume
        typer.echo(str(stop), err=True)
        sys.exit(stop.exit_code)
    except (UserError, RunFailed) as error:  # a failed replica printed its own error first
        # Under torchrun every process meets a user's mistake: rank 0 says it and exits 2 first
        # (torchrun reports the first failure and stops the others); the rest wait a moment.
        if isinstance(error, UserError) and int(os.environ.get("RANK", "0")) > 0:
            time.sleep(OTHER_RANKS_WAIT_SECONDS)
        else:
            typer.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
