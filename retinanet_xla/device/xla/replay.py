"""Run a training step's compiled graph again without tracing it again.

With lazy tensors the host re-runs the step's Python every step, only to find the graph it
already compiled, which for a ResNet-50 FPN takes longer than a TPU core needs to run the step
(docs/performance.md, "Host time per step"). ``GraphReplay`` traces the step once, on the first call. From what it traced it keeps

- the compiled graph, found by its hash in torch_xla's computation cache;
- the graph's inputs, each tagged: a tensor of the step's state (weights, buffers, optimizer
  state, step counter), a tensor of the batch, the random seed, or a constant (the scalars and
  tables the step created while tracing, the same every step);
- which state tensors the step updates in place: the graph's first outputs.

Every later call looks up the current state and batch tensors, runs the cached graph on them
(``_run_cached_graph``, what torch_xla's dynamo bridge replays with) and copies the outputs
into the updated state tensors (one ``_foreach_copy_``, which points each at its new device
buffer): the same Python tensors, so the model, the optimizer and checkpoints see the new
values. The host's cost per step is then a few milliseconds, whatever the model.

What it needs from the step: the same graph every call for batches of the same shapes, which
the trainer already guarantees ("zero compilations after warm-up"), and every tensor it updates
listed in ``state``. Anything else the step changed would be lost: ``_capture`` refuses a step
that updates a tensor it was not told about. ``runtime.step_graph: retrace`` goes back to
tracing every step.
"""

import contextlib
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from retinanet_xla.device.runtime import StepProgram
    from retinanet_xla.device.xla.runtime import XlaRuntime

Slot = Tuple[str, object]  # ("state", index) | ("batch", key) | ("seed", None) | ("constant", tensor)


class StepNotReplayable(RuntimeError):
    """The step changed device tensors that are not part of its declared state."""


class GraphReplay:
    """``program.trace(batch) -> outputs``, traced on the first call and replayed afterwards.

    ``program.state_tensors()``: every tensor the step reads and may update in place;
    ``program.after_trace()`` drops what the traced step leaves behind that is neither state nor
    output (gradients). From ``runtime``: ``launch_collective(run)``, how the graph is started
    (replicas that are threads take turns); ``donate_step_buffers``, whether the updated
    state's old buffers become its new values' (see ``_capture``); and ``wait()``, since the
    cached graph reads its inputs' buffers at launch, so the previous step must be done."""

    def __init__(self, program: "StepProgram", runtime: "XlaRuntime"):
        self.program, self.runtime = program, runtime
        self.graph: Optional[str] = None
        self.state: List[Tensor] = []
        self.updated: List[int] = []
        self.slots: List[Slot] = []
        self.keys: List[str] = []
        self.waited_seconds = 0.0  # in calls, for the previous step to finish (not host work)

    def __call__(self, batch: Dict[str, Tensor]) -> Dict[str, Tensor]:
        if self.graph is None:
            return self._capture(batch)
        started = time.perf_counter()
        self.runtime.wait()
        self.waited_seconds += time.perf_counter() - started
        return self._run([self._input(slot, batch) for slot in self.slots])

    def _input(self, slot: Slot, batch: Dict[str, Tensor]) -> Tensor:
        kind, value = slot
        if kind == "state":
            return self.state[value]
        if kind == "batch":
            return batch[value]
        if kind == "seed":
            # A new seed every step from torch's generator, as torch_xla draws one per graph:
            # random ops (stochastic depth in EfficientNet and ConvNeXt) differ from step to
            # step, and a resumed run, which restores torch's RNG state, draws the same ones.
            return torch.randint(0, 2**62, (), dtype=torch.int64).to(self.state[0].device)
        return value

    def _run(self, inputs: List[Tensor], before: Callable[[], None] = lambda: None) -> Dict[str, Tensor]:
        import torch_xla

        results: List[Tensor] = []

        def run() -> None:
            before()
            results.extend(torch_xla._XLAC._run_cached_graph(self.graph, inputs))

        self.runtime.launch_collective(run)
        with torch.no_grad():
            torch._foreach_copy_([self.state[index] for index in self.updated], results[: len(self.updated)])
        return dict(zip(self.keys, results[len(self.updated) :]))

    def _capture(self, batch: Dict[str, Tensor]) -> Dict[str, Tensor]:
        import torch_xla

        xla = torch_xla._XLAC
        self.runtime.wait()  # the state's buffers must be ready: the first run reads them as they are
        self.state = _distinct(self.program.state_tensors())
        device = str(self.state[0].device)
        # Before tracing: an in-place update may give a tensor a new XLA tensor id, while the
        # graph's inputs keep the ids their buffers had.
        known: Dict[int, Slot] = {xla._xla_get_tensor_id(t): ("state", i) for i, t in enumerate(self.state)}
        known.update({xla._xla_get_tensor_id(t): ("batch", key) for key, t in batch.items()})
        outputs = self.program.trace(batch)
        self.program.after_trace()
        pending = xla._check_tensor_need_materialization(self.state)
        self.updated = [index for index, changed in enumerate(pending) if changed]
        self.keys = list(outputs)
        roots = [self.state[index] for index in self.updated] + [outputs[key] for key in self.keys]
        del outputs
        tensor_ids, values = xla._get_tensors_xla_device_data_node(roots)
        seed = xla._get_seed_info_id()
        self.slots = [("seed", None) if tid == seed else known.get(tid, ("constant", v)) for tid, v in zip(tensor_ids, values)]
        inputs = {value for kind, value in self.slots if kind == "state"}
        unread = [i for i in self.updated if i not in inputs and self.state[i].is_floating_point()]
        if unread:  # an update that does not read the value it updates: likely not seen as an input
            raise StepNotReplayable(
                f"the training step's graph does not read {len(unread)} of the tensors it updates "
                f"(the first has shape {list(self.state[unread[0]].shape)}); set runtime.step_graph: retrace"
            )
        # With ``donate``, the buffers of the state the step updates are donated to its new
        # values, as a traced step's are (XLA_ENABLE_PARAM_ALIASING): without, a step holds the
        # old and the new weights, momentum and average at once.
        if self.runtime.donate_step_buffers:
            updated = set(self.updated)
            for slot, value in zip(self.slots, values):
                if slot[0] == "state" and slot[1] in updated:
                    xla._set_buffer_donation(value, True)
        with _aliasing(xla, self.runtime.donate_step_buffers):
            self.graph = xla._get_graph_hash(roots)
        # Compiled (or found in the cache) without running, then run on the buffers it was
        # traced from (and a seed drawn like every later one's): this first step's result, and
        # every traced tensor replaced or gone.
        first = [self._input(slot, batch) if slot[0] == "seed" else value for slot, value in zip(self.slots, values)]
        results = self._run(first, before=lambda: _compile(xla, roots, self.runtime.donate_step_buffers))
        roots.clear()
        left = xla._xla_tensors_report(1, device)  # more than a device-data node: computed
        if left:  # a change every replay would lose
            raise StepNotReplayable(
                f"the training step changed device tensors outside its state ({left.splitlines()[0]}); "
                "set runtime.step_graph: retrace"
            )
        return results


def _compile(xla, roots: List[Tensor], donate: bool) -> None:
    with _aliasing(xla, donate):
        xla._xla_warm_up_cache(roots, [])  # compiles (or finds) the graph; runs nothing


@contextlib.contextmanager
def _aliasing(xla, donate: bool):
    """Graphs hashed and compiled in here alias the buffers marked for donation to outputs, or
    alias nothing (the hash differs: hash and compile under the same setting)."""
    saved = xla._xla_get_enable_alias_with_buffer_donor_config()
    xla._xla_set_enable_alias_with_buffer_donor_config(donate)
    try:
        yield
    finally:
        xla._xla_set_enable_alias_with_buffer_donor_config(saved)


def _distinct(tensors: Sequence[Tensor]) -> List[Tensor]:
    seen, distinct = set(), []
    for tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            distinct.append(tensor)
    return distinct
