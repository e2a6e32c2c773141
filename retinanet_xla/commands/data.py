"""``retinanet-xla data ...``: write the synthetic dataset, check or convert a dataset, time the pipeline."""

from pathlib import Path
from typing import Optional

import typer

from retinanet_xla.errors import ConfigError

# Each command imports its module when it runs: the data package imports torch, which takes
# seconds, and `--help` should not (docs/performance.md, "Start-up").

data_app = typer.Typer(
    help="Datasets: write the synthetic one, check one, convert COCO to record shards or YOLO / VOC to COCO, time the input pipeline.",
    no_args_is_help=True,
)


@data_app.command("synth")
def synth(
    output_dir: str = typer.Argument(..., help="Directory to write annotations/, train/ and val/ into."),
    images: int = typer.Option(256, "--images", min=1, help="Training images."),
    val_images: int = typer.Option(64, "--val-images", min=1, help="Validation images."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed writes the same dataset."),
) -> None:
    """Write the synthetic shapes dataset in the COCO 2017 layout."""
    from retinanet_xla.data.synthetic import write_synthetic_dataset

    paths = write_synthetic_dataset(output_dir, images, val_images, seed)
    for split, split_paths in paths.items():
        typer.echo(f"{split}: {split_paths['annotations']} ({split_paths['images']})")


@data_app.command("check")
def check(
    annotations: str = typer.Argument(..., help="COCO instances JSON."),
    images: str = typer.Option(..., "--images", help="Directory the file names are relative to."),
    decode: bool = typer.Option(True, "--decode/--no-decode", help="Decode every image (slow for large datasets)."),
) -> None:
    """Report every problem of a dataset; exit code 1 when there is any."""
    from retinanet_xla.data.check import check_dataset

    report = check_dataset(annotations, images, decode)
    for line in report.lines():
        typer.echo(line)
    raise typer.Exit(0 if report.ok else 1)


@data_app.command("convert")
def convert_command(
    source: str = typer.Argument(
        ...,
        help="A COCO instances JSON (--from coco), or a dataset directory: YOLO (images/, labels/, classes.txt or data.yaml) or Pascal VOC (Annotations/, JPEGImages/).",
    ),
    source_format: str = typer.Option(..., "--from", help="coco | yolo | voc"),
    output: str = typer.Option(
        ..., "--output", help="--from coco: the PREFIX of the record shards (local or gs://); otherwise the COCO JSON to write."
    ),
    images: Optional[str] = typer.Option(
        None, "--images", help="--from coco: the directory the JSON's file names are relative to."
    ),
    shards: int = typer.Option(1, "--shards", min=1, help="--from coco: how many record shards to write."),
    split: Optional[str] = typer.Option(
        None,
        "--split",
        help="--from yolo: the split to convert (images/SPLIT or SPLIT/images, e.g. train or val), one COCO file each; all merges them.",
    ),
) -> None:
    """Write a COCO dataset as record shards (read with data.train.records: PREFIX), or a YOLO (one split at a time) or Pascal VOC dataset as one COCO file; what cannot be used is counted and named, never trained on.

    Example: retinanet-xla data convert coco/annotations/instances_train2017.json --from coco --images coco/train2017 --output gs://my-bucket/coco-records/train --shards 64"""
    from retinanet_xla.data.convert import convert
    from retinanet_xla.data.records import write_records

    if source_format == "coco":
        if split is not None:
            raise ConfigError("--split goes with --from yolo (a COCO file is one split already)")
        if images is None:
            raise ConfigError("--from coco needs --images, the directory the JSON's file names are relative to")
        coco = write_records(source, images, output, shards)
        boxes = sum(len(record.boxes) for record in coco.records)
        typer.echo(
            f"wrote {output}.json and {shards} shard(s) {output}-*-of-{shards:05d}.rxr: {len(coco.records)} images, {boxes} boxes"
        )
        for line in coco.problem_lines("left out, "):
            typer.echo(line)
        return
    conversion = convert(source_format, Path(source), Path(output), split)
    for line in conversion.lines(Path(output)):
        typer.echo(line)
    role = "val" if split in ("val", "valid", "test") else "train"
    typer.echo(f"use it with: --set data.{role}.annotations={output} --set data.{role}.images={conversion.images_dir}")


@data_app.command("bench")
def bench(
    image_size: int = typer.Option(640, "--image-size", min=32, help="Square training input size."),
    num_images: int = typer.Option(200, "--images", min=1, help="Samples to time."),
    annotations: Optional[str] = typer.Option(None, "--annotations", help="A COCO file to read instead of synthetic images."),
    images: Optional[str] = typer.Option(None, "--images-dir", help="Images directory for --annotations."),
    records: Optional[str] = typer.Option(
        None, "--records", help="Record shards' PREFIX to read instead (data convert --from coco)."
    ),
) -> None:
    """Training-pipeline throughput of one worker, every augmentation on; local files, a bucket (gs://) or record shards."""
    from retinanet_xla.data.throughput import measure_pipeline

    if (annotations is None) != (images is None):
        raise typer.BadParameter("--annotations and --images-dir go together")
    result = measure_pipeline((image_size, image_size), num_images, annotations, images, records=records)
    typer.echo(
        f"data pipeline: {result.images_per_second:.1f} images/s per worker at {image_size}x{image_size} "
        f"({result.images} images in {result.seconds:.2f} s; {result.source})"
    )
