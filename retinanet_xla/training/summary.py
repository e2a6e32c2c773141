"""The timing and compilation part of a run's summary, the same keys for ``train``'s
``summary.json`` and ``bench``'s JSON."""

import json
import logging
from typing import Dict, Optional

from retinanet_xla.device.runtime import Runtime

logger = logging.getLogger(__name__)
WAIT_KEYS = ("device_wait_fraction", "input_wait_fraction", "device_idle_fraction")
# What a backend's ``compilations()`` adds: the persistent XLA cache's counters, and
# torch.compile's graph breaks (a compiled step has none; a break would split it).
EXTRA_KEYS = ("cache_hits", "cache_misses", "cache_load_failures", "graph_breaks")


def timing_summary(
    runtime: Runtime,
    compiled: Dict[str, float],
    first_step_seconds: float,
    images_per_second: Optional[float],
    compilations_after_warmup: int,
    waits: Dict[str, Optional[float]],
) -> Dict:
    """``compiled``: ``runtime.compilations()`` when the timed steps ended; ``waits``:
    ``InputWait.fractions()`` after step 1 (empty when no step followed it)."""
    return {
        "device": str(runtime.device),
        "step_graph": runtime.step_graph,
        "replicas": runtime.replicas.world,
        "first_step_seconds": round(first_step_seconds, 3),
        "images_per_second": None if images_per_second is None else round(images_per_second, 3),
        **{key: waits.get(key) for key in WAIT_KEYS},
        "compilations_total": compiled["count"],
        "compilations_after_warmup": compilations_after_warmup,
        "compile_seconds": round(compiled["seconds"], 3),
        "compile_cache": str(runtime.compile_cache) if runtime.compile_cache else None,
        **{key: compiled[key] for key in EXTRA_KEYS if key in compiled},
    }


def write_run_summary(run, warm_up, utilisation) -> Dict:
    """``train``'s summary, which the master writes to ``summary.json`` and uploads with the
    logs (``run``: ``setup.TrainingRun``; ``warm_up``: ``periodic.WarmUp``; ``utilisation``:
    the master's ``flops.Utilisation``, None elsewhere)."""
    summary = run_summary(run, warm_up, utilisation)
    if run.replicas.is_master:
        (run.files.local / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        run.files.push()
    if summary["compilations_after_warmup"]:
        logger.warning("%d compilation(s) happened after warm-up", summary["compilations_after_warmup"])
    return summary


def run_summary(run, warm_up, utilisation) -> Dict:
    """What ran, how fast (after step 1), the losses and the last evaluation."""
    c = run.config.train
    steps_run = c.steps - run.start_step
    warm_steps, warm_seconds = steps_run - 1, (warm_up.warm_clock.seconds() if warm_up.warm_clock else 0.0)
    waits = warm_up.input_wait.fractions() if warm_up.input_wait is not None and c.steps > warm_up.first else {}
    images_per_second = warm_steps * c.batch_size / warm_seconds if warm_steps > 0 and warm_seconds else None
    return {
        "steps": c.steps,
        "resumed_from_step": run.start_step,
        "images": steps_run * c.batch_size,
        "wall_seconds": round(warm_up.clock.seconds(), 3),
        **timing_summary(
            run.runtime,
            run.runtime.compilations(),
            first_step_seconds=warm_up.first_step_seconds,
            images_per_second=images_per_second,
            compilations_after_warmup=warm_up.compiles.after_warmup() if steps_run else 0,
            waits=waits,
        ),
        **(utilisation.report(images_per_second) if utilisation is not None else {}),
        "first_loss": run.losses.get("first"),
        "final_loss": run.losses.get("final"),
        "truncated_images": run.batches.truncated,
        "unreadable_images": run.batches.unreadable,
        "checkpoint": str(run.last_checkpoint) if run.last_checkpoint else None,
        "eval": run.last_eval,
    }
