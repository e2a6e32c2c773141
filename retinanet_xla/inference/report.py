"""``retinanet-xla report RUN``: the pictures of a run a person would rather look at than read.

``RUN/report/``: PNG curves from ``metrics.jsonl`` (the loss and its parts, learning rate,
images/s, AP and AP50 over steps with AP per category, and what ``eval`` wrote under
``RUN/eval/``), a grid of validation images with the
ground truth beside the newest checkpoint's detections, and ``index.html``, one self-contained
page (the PNGs inlined) that shows them all. The detections are computed on the host CPU
(eager), so a report never compiles an XLA graph.
"""

import base64
import html
import io
import logging
import math
from typing import Dict, List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")  # no display; set before pyplot is imported
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from retinanet_xla import storage  # noqa: E402
from retinanet_xla.data.image_io import read_rgb  # noqa: E402
from retinanet_xla.data.splits import dataset_split  # noqa: E402
from retinanet_xla.errors import CheckpointError, UserError  # noqa: E402
from retinanet_xla.inference.loading import load_for_inference  # noqa: E402
from retinanet_xla.inference.predict import detect, draw, ground_truth_boxes  # noqa: E402
from retinanet_xla.rundir.directory import local_run_files  # noqa: E402
from retinanet_xla.rundir.rows import evaluation_row, json_object, metrics_rows  # noqa: E402
from retinanet_xla.storage import Location  # noqa: E402

logger = logging.getLogger(__name__)

GRID_IMAGES = 8
TILE = 256  # pixels of the longer side of each picture in the grid


def read_rows(run: Location) -> Tuple[List[Dict], List[Dict]]:
    """``metrics.jsonl``'s training rows and evaluation rows, in step order (lines of another
    shape, cut off by a kill or edited, are left out with a warning: ``rundir.rows``)."""
    path = storage.join(run, "metrics.jsonl")
    if not storage.is_file(path):
        raise UserError(f"{run}: no metrics.jsonl: not a run directory, or a run that logged nothing yet")
    rows = metrics_rows(storage.read_text(path))
    if rows.dropped:
        logger.warning("%s: %d line(s) are not rows this program writes; left out of the report", path, rows.dropped)
    train, evaluations = rows.train, rows.evaluations
    # What ``retinanet-xla eval RUN`` wrote (RUN/eval/step_N/metrics.json), for steps training
    # did not evaluate itself: the final evaluation of a run without periodic ones (make demo).
    evaluated = {row["step"] for row in evaluations}
    for metrics_file in (
        storage.glob(storage.join(run, "eval"), "*/metrics.json") if storage.is_dir(storage.join(run, "eval")) else []
    ):
        metrics = json_object(storage.read_text(metrics_file)) or {}
        row = evaluation_row({"step": metrics.get("step"), "eval": metrics})  # None: not one eval wrote
        if row is not None and row["step"] not in evaluated:
            evaluated.add(row["step"])
            evaluations.append(row)
    return train, sorted(evaluations, key=lambda row: row["step"])


def _figure(title: str, ylabel: str):
    figure, axes = plt.subplots(figsize=(7, 3.6), dpi=100)
    axes.set_title(title, fontsize=11)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _finite(rows: List[Dict], key: str) -> Tuple[List[int], List[float]]:
    points = [(row["step"], row[key]) for row in rows if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
    return [p[0] for p in points], [p[1] for p in points]


def curves(train: List[Dict], evaluations: List[Dict]) -> Dict[str, bytes]:
    """PNG bytes by file name: losses, learning rate, images/s, and the evaluations if any."""
    pictures = {}
    figure, axes = _figure("loss = cls_loss + box_loss x loss.box_loss_weight", "loss")
    steps, loss = _finite(train, "loss")
    _, cls = _finite(train, "cls_loss")
    axes.plot(steps, loss, label="loss", color="black")
    if len(cls) == len(loss):
        axes.plot(steps, cls, label="cls_loss")
        axes.plot(steps, [total - part for total, part in zip(loss, cls)], label="weighted box loss")
    axes.legend()
    pictures["loss.png"] = _png(figure)
    figure, axes = _figure("learning rate", "lr")
    axes.plot(*_finite(train, "lr"))
    pictures["lr.png"] = _png(figure)
    figure, axes = _figure("training throughput (after the first step; evaluation time excluded)", "images/s")
    axes.plot(*_finite(train, "images_per_second"))
    pictures["images_per_second.png"] = _png(figure)
    if evaluations:
        figure, axes = _figure("validation AP over steps", "AP")
        steps = [row["step"] for row in evaluations]
        for key, style in (("AP", "-o"), ("AP50", "-s")):
            axes.plot(steps, [row["eval"].get(key, float("nan")) for row in evaluations], style, label=key, linewidth=2)
        for name in evaluations[-1]["eval"].get("per_category_AP", {}):
            values = [row["eval"].get("per_category_AP", {}).get(name, -1) for row in evaluations]
            axes.plot(steps, [v if v >= 0 else float("nan") for v in values], "--", alpha=0.6, label=f"AP {name}")
        axes.set_ylim(0, 1)
        axes.legend(fontsize=7, ncol=2)
        pictures["ap.png"] = _png(figure)
    return pictures


def _fit(image: Image.Image) -> Image.Image:
    scale = TILE / max(image.size)
    return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))


def prediction_grid(run: Location, score_threshold: float, count: int = GRID_IMAGES) -> Tuple[bytes, str]:
    """A PNG: one row per validation image, ground truth on the left, detections on the right;
    and the checkpoint it shows."""
    loaded = load_for_inference(run, ["runtime.device=cpu"])
    data = loaded.config.data
    trained_on_synthetic = data.train.annotations is None and data.train.records is None
    if data.val.annotations is None and data.val.records is None and not trained_on_synthetic:
        # The built-in synthetic split would show shapes to a model of other classes.
        raise UserError("no validation split configured (data.val.annotations or data.val.records)")
    coco = dataset_split(loaded.config, "val", local_run_files(loaded.checkpoint))
    coco.mapping = loaded.mapping
    records = coco.records[:count]
    images = [read_rgb(record.path) for record in records]
    found = detect(loaded, images, score_threshold)
    rows = []
    for record, image, detections in zip(records, images, found):
        truth = ground_truth_boxes(record, loaded.mapping, loaded.mapping.names)
        rows.append((_fit(draw(image, truth, scores=False)), _fit(draw(image, detections))))
    gap, header = 8, 22
    width = 2 * TILE + 3 * gap
    height = header + sum(max(a.height, b.height) + gap for a, b in rows) + gap
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    pen = ImageDraw.Draw(grid)
    pen.text((gap, 4), "ground truth", fill=(0, 0, 0))
    pen.text((2 * gap + TILE, 4), f"detections (score >= {score_threshold})", fill=(0, 0, 0))
    y = header
    for truth, predicted in rows:
        grid.paste(truth, (gap, y))
        grid.paste(predicted, (2 * gap + TILE, y))
        y += max(truth.height, predicted.height) + gap
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    return buffer.getvalue(), str(loaded.checkpoint)


def _inline(name: str, data: bytes) -> str:
    kind = ' class="wide"' if name == "predictions.png" else ""  # shown at its own size
    return f'<figure{kind}><img alt="{name}" src="data:image/png;base64,{base64.b64encode(data).decode()}"><figcaption>{name}</figcaption></figure>'


def page(run: Location, pictures: Dict[str, bytes], summary: Optional[Dict], evaluations: List[Dict], note: str) -> str:
    """One HTML page with everything inlined: it can be mailed or opened from a bucket."""
    rows = []
    if summary:
        for key in ("steps", "images_per_second", "first_loss", "final_loss", "compilations_after_warmup", "checkpoint"):
            value = summary.get(key)
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)  # 0.4125, not 0.41249999
            rows.append(f"<tr><th>{key}</th><td>{html.escape(shown)}</td></tr>")
    if evaluations:
        last = evaluations[-1]
        for key in ("AP", "AP50", "AP75"):
            rows.append(f"<tr><th>{key} (step {last['step']})</th><td>{last['eval'].get(key, float('nan')):.3f}</td></tr>")
        for name, value in last["eval"].get("per_category_AP", {}).items():
            shown = f"{value:.3f}" if value >= 0 else "n/a"
            rows.append(f"<tr><th>AP {html.escape(name)}</th><td>{shown}</td></tr>")
    order = ("loss.png", "ap.png", "lr.png", "images_per_second.png", "predictions.png")
    figures = "\n".join(_inline(name, pictures[name]) for name in order if name in pictures)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>retinanet-xla report: {html.escape(str(run))}</title>
<style>
body {{ font-family: sans-serif; margin: 24px; color: #222; background: #fff; }}
h1 {{ font-size: 20px; }} table {{ border-collapse: collapse; margin-bottom: 16px; }}
th, td {{ text-align: left; padding: 2px 12px 2px 0; font-size: 13px; }}
figure {{ display: inline-block; margin: 0 16px 16px 0; vertical-align: top; }}
figcaption {{ font-size: 12px; color: #666; }} img {{ width: 560px; max-width: 100%; border: 1px solid #ddd; }}
figure.wide img {{ width: auto; }}
</style></head>
<body><h1>{html.escape(str(run))}</h1>
<p>{html.escape(note)}</p>
<table>{"".join(rows)}</table>
{figures}
</body></html>
"""


def write_report(run: Location, score_threshold: float = 0.3) -> Location:
    """Write ``RUN/report/`` (PNGs and ``index.html``); returns the page's location."""
    run = storage.location(run)
    train, evaluations = read_rows(run)
    summary_path = storage.join(run, "summary.json")
    summary = json_object(storage.read_text(summary_path)) if storage.is_file(summary_path) else None
    pictures = curves(train, evaluations)
    try:
        pictures["predictions.png"], checkpoint = prediction_grid(run, score_threshold)
        note = f"Validation images: ground truth (left), detections of {checkpoint} (right)."
    except (CheckpointError, UserError) as error:  # no checkpoint yet, or the data is not here
        note = f"No prediction grid: {error}"
    target = storage.join(run, "report")
    with storage.written_through(target) as local:
        for name, data in pictures.items():
            (local / name).write_bytes(data)
        (local / "index.html").write_text(page(run, pictures, summary, evaluations, note))
    return storage.join(target, "index.html")


def write_report_or_warn(run: Location) -> Optional[str]:
    """``write_report`` for a command that has done its real work (trained, evaluated): a report
    that cannot be drawn is a warning, not a failure; the page's location, or None."""
    try:
        return str(write_report(run))
    except (UserError, OSError, RuntimeError, ValueError) as error:
        logger.warning("could not write the report: %s", str(error).splitlines()[0] if str(error) else type(error).__name__)
        return None
