"""The training step as one ``torch.compile`` graph: forward, loss, gradients, clipping, the
update, the weight average and the step counter. ``fullgraph=True`` turns a graph break into an
error at the first call instead of a silent split; ``dynamic=False``: every batch has the
config's static shapes, as on XLA."""

from typing import Dict

import torch

from retinanet_xla.device.runtime import Batch, StepProgram


class CompiledProgram:
    waited_seconds = 0.0  # a compiled step's launch does not wait for the step before

    def __init__(self, program: StepProgram, backend: str, mode: str = "default"):
        # ``mode`` (runtime.compile_mode) only where it is not the default: a backend other
        # than inductor may not know the others.
        options = {} if mode == "default" else {"mode": mode}
        self._step = torch.compile(program.trace, backend=backend, fullgraph=True, dynamic=False, **options)

    def __call__(self, batch: Batch) -> Batch:
        # The step's gradients (torch.autograd.grad) are traced into its graph only with
        # this setting (torch 2.14: off by default); without it, fullgraph refuses the step.
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            return self._step(batch)


def compile_counts() -> Dict[str, float]:
    """Graphs compiled in this process, the seconds spent and the graph breaks, as torch's
    dynamo counts them."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    return {
        "count": int(counters["stats"]["unique_graphs"]),
        "seconds": round(sum(compilation_time_metrics.get("_compile.compile_inner", [])), 3),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }
