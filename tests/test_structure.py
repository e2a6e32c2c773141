"""The package's structure, as docs/architecture.md ("How to check") states it: counts read from
the source (an AST walk and text searches), so that a change that undoes them fails here."""

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "retinanet_xla"


def sources(*parts: str):
    return sorted((PACKAGE.joinpath(*parts)).rglob("*.py"))


def outside_device():
    return [path for path in sources() if "device" not in path.relative_to(PACKAGE).parts[:1]]


def test_the_loop_is_short_and_no_training_function_is_long():
    trainer = PACKAGE / "training" / "trainer.py"
    tree = ast.parse(trainer.read_text())
    assert len(trainer.read_text().splitlines()) <= 220
    assert sum(isinstance(node, (ast.Import, ast.ImportFrom)) for node in tree.body) <= 10
    long = []
    for path in sources("training"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []


# What asking which backend runs looks like: its lazy flag, its kind, a device type, torch's
# private list of devices with capturable kernels, a device name compared as a string.
BACKEND_QUESTIONS = re.compile(
    r"\.lazy\b|runtime\.kind\b|\.device\.type\s*[=!]=|_get_capturable_supported_devices|[=!]=\s*['\"](xla|cuda|tpu|cpu)['\"]"
)


def test_nothing_outside_the_device_layer_asks_which_backend_runs():
    asked = [
        f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
        for path in outside_device()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if BACKEND_QUESTIONS.search(line.split("#")[0])
    ]
    assert asked == []


@pytest.mark.parametrize(
    "line",
    [
        "if self.runtime.lazy:",
        "kind = runtime.kind",
        "if params[0].device.type == 'cuda':",
        "supported = _get_capturable_supported_devices()",
        'if kind == "xla":',
    ],
)
def test_the_backend_question_search_finds_each_form_it_forbids(line):
    assert BACKEND_QUESTIONS.search(line)


def test_batches_are_shared_between_replicas_in_two_places_and_commands_count_no_replicas():
    splits = [
        f"{path.relative_to(PACKAGE)}:{number}"
        for path in outside_device()
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\.share\(|split_batch\(", line)
    ]
    assert len(splits) <= 2, splits  # the training stream's share and the evaluator's
    for command in sources("commands"):
        text = command.read_text()
        assert not re.search(r"local_replica_count|\.world\b.*//|//.*\.world\b", text), command.name
        resolved = len(re.findall(r"plan_launch\(|create_runtime\(|runtime_class\(|resolve_device\(", text))
        assert resolved <= 1, f"{command.name} resolves runtime.device {resolved} times"


def test_the_training_state_is_listed_once():
    """``TrainState`` lists the state; the step, the build and the checkpoint use it."""
    listing = re.compile(r"loss_fn\.state_dict\(|optimizer\.state_tensors\(\)")
    places = [path.name for path in sources("training") if listing.search(path.read_text())]
    assert places == ["state.py"]
