"""The timing and compilation part of a run's summary, the same keys for ``train``'s
``summary.json`` and ``bench``'s JSON."""

from typing import Dict, Optional

from retinanet_xla.device.runtime import Runtime

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
