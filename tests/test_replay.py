"""The training step traced once and replayed (``runtime.step_graph: replay``, device/xla/replay.py)
gives what tracing every step gives, compiles nothing more, and refuses steps it would get
wrong."""

import pytest
import torch

from retinanet_xla.config import RuntimeConfig, load_config
from retinanet_xla.device.xla.replay import GraphReplay, StepNotReplayable
from retinanet_xla.device.xla.runtime import XlaRuntime
from retinanet_xla.training.build import build_train_step
from tests.cli_helpers import ROOT, TINY

pytestmark = pytest.mark.xla
LOGGED = ("loss", "cls_loss", "box_loss", "num_foreground", "lr", "grad_norm")


def batches(device, count=3):
    generator = torch.Generator().manual_seed(0)
    found = []
    for index in range(count):
        boxes = torch.zeros(4, 8, 4)
        labels = torch.full((4, 8), -1)
        for image in range(4):
            for slot in range((image + index) % 4 + 1):
                xy = torch.rand(2, generator=generator) * 40
                boxes[image, slot] = torch.cat([xy, xy + torch.rand(2, generator=generator) * 20 + 6])
                labels[image, slot] = slot % 4
        images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=generator)
        crowd = torch.zeros(4, 8, dtype=torch.bool)
        found.append({k: v.to(device) for k, v in zip(("images", "boxes", "labels", "crowd"), (images, boxes, labels, crowd))})
    return found


def run_steps(step_graph: str, steps: int = 4, donate: bool = False):
    """``steps`` train steps of the tiny smoke model with a weight average, clipping and warmup,
    the trainer's way (a sync after each call); every step's logged values, the final state and
    the graphs compiled after step 1."""
    import torch_xla
    import torch_xla.debug.metrics as metrics

    overrides = [*TINY, "train.ema_decay=0.9", "train.grad_clip_norm=0.5", f"runtime.step_graph={step_graph}"]
    config = load_config(ROOT / "configs" / "smoke.yaml", overrides)
    runtime = XlaRuntime(config.runtime)
    runtime.donate_step_buffers = donate  # the TPU's default; off on the CPU client
    aliased = metrics.metric_data("InputOutputAliasCount")
    step = build_train_step(config, runtime, max_boxes=8)  # TINY's auto on the synthetic shapes
    data = batches(runtime.device)
    logged = []
    for index in range(steps):
        outputs = step(data[index % len(data)])
        runtime.end_step()
        logged.append({key: outputs[key].cpu() for key in LOGGED})
        if index == 0:
            compiled = metrics.metric_data("CompileTime")[0]
            aliased = metrics.metric_data("InputOutputAliasCount")[1] - (aliased[1] if aliased else 0)
    torch_xla.sync()
    state = [tensor.cpu() for tensor in step.state_tensors()]
    return logged, state, metrics.metric_data("CompileTime")[0] - compiled, aliased, step


@pytest.mark.parametrize("donate", [False, True], ids=["cpu-client", "donating"])
def test_replay_gives_the_traced_steps_values_and_compiles_nothing_after_step_one(donate):
    traced, traced_state, _, _, _ = run_steps("retrace")
    replayed, replayed_state, compiled_after_first, aliased, step = run_steps("replay", donate=donate)
    assert isinstance(step._launch, GraphReplay)
    # With donation, every updated state buffer the graph reads becomes its new value's, as in
    # a traced step: no second copy of the weights, momentum and average during a step.
    read = {index for kind, index in step._launch.slots if kind == "state"}
    assert aliased == (len(read & set(step._launch.updated)) if donate else 0)
    assert not donate or aliased > 300
    kinds = [kind for kind, _ in step._launch.slots]
    assert kinds.count("batch") == 4 and "seed" not in kinds  # nothing random in this model
    assert compiled_after_first == 0
    for traced_step, replayed_step in zip(traced, replayed):
        for key in LOGGED:
            torch.testing.assert_close(replayed_step[key], traced_step[key], rtol=1e-6, atol=1e-7)
    assert replayed[3]["loss"] != replayed[2]["loss"]  # the steps did change the weights
    for expected, got in zip(traced_state, replayed_state):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


class Program:
    """A step for ``GraphReplay``: ``trace``, its state, nothing to drop after tracing."""

    def __init__(self, trace, state):
        self.trace, self.state = trace, state

    def state_tensors(self):
        return self.state

    def after_trace(self):
        pass


def toy_step(weight, noise: bool = False):
    def step(batch):
        x = batch["x"]
        if noise:
            x = torch.nn.functional.dropout(x, 0.5)
        loss = (x * weight).sum()
        weight.sub_(0.1 * loss)
        return {"loss": loss}

    return step


def test_a_random_step_draws_a_new_seed_for_every_step_from_torchs_generator():
    import torch_xla

    device = torch_xla.device()

    def kept_counts(seed):
        torch.manual_seed(seed)
        steps, batch = torch.zeros((), device=device), {"x": torch.ones(256, device=device)}
        torch_xla.sync()

        def step(batch):
            steps.add_(1)
            return {"kept": (torch.nn.functional.dropout(batch["x"], 0.5) > 0).sum()}

        replay = GraphReplay(Program(step, [steps]), XlaRuntime(RuntimeConfig()))
        counts = [int(replay(batch)["kept"].cpu()) for _ in range(4)]
        assert ("seed", None) in replay.slots and float(steps.cpu()) == 4
        return counts

    counts = kept_counts(1)
    assert len(set(counts)) > 1, f"the same dropout mask every step: {counts}"
    assert kept_counts(1) == counts  # the same torch seed, the same masks (a resumed run's)
    assert kept_counts(2) != counts


def test_a_step_that_changes_a_tensor_outside_its_state_is_refused():
    import torch_xla

    device = torch_xla.device()
    weight, counter = torch.ones(8, device=device), torch.zeros((), device=device)
    torch_xla.sync()

    def step(batch):
        counter.add_(1)  # not declared: every replay would lose it
        return toy_step(weight)(batch)

    replay = GraphReplay(Program(step, [weight]), XlaRuntime(RuntimeConfig()))
    with pytest.raises(StepNotReplayable, match="outside its state"):
        replay({"x": torch.ones(8, device=device)})
    torch_xla.sync()


def test_bench_trace_only_traces_the_step_and_never_runs_it(tmp_path, capsys, monkeypatch):
    import json

    import torch_xla.debug.metrics as metrics

    from tests.cli_helpers import run_cli

    def executions():
        data = metrics.metric_data("ExecuteTime")
        return data[0] if data else 0

    before = executions()
    args = ["bench", str(ROOT / "configs" / "smoke.yaml"), "--steps", "4", "--trace-only", "--json", str(tmp_path / "b.json")]
    for override in TINY:
        args += ["--set", override]
    result = run_cli(capsys, monkeypatch, *args)
    assert result.exit_code == 0, result.stderr[-2000:]
    bench = json.loads((tmp_path / "b.json").read_text())
    assert bench["step_graph"] == "traced, never run" and bench["trace_seconds"] > 0
    assert f"tracing the step takes {bench['trace_seconds'] * 1000:.1f} +- " in result.stdout
    assert executions() - before <= 1  # the weights' placement only: no step ran
