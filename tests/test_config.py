from pathlib import Path

import pytest

from retinanet_xla.config import Config, ConfigError, all_keys, load_config
from retinanet_xla.models import BACKBONES
from tests.cli_helpers import run_cli, set_options

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_defaults_are_the_reference_recipe():
    config = load_config()
    assert config.data.image_size == [640, 640]
    assert config.model.backbone.name == "resnet50" and config.model.anchors.offset == 0.5
    assert config.model.box_coder_weights == [10.0, 10.0, 5.0, 5.0]
    assert (config.loss.focal_alpha, config.loss.focal_gamma, config.loss.box_loss_beta) == (0.25, 1.5, 0.1)
    assert config.train.schedule.decay_steps == [53440, 62820]


def test_overrides_convert_types_and_extends_merges(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train: {steps: 10, batch_size: 4}\nmodel: {backbone: {name: resnet18}}\n")
    child = tmp_path / "child.yaml"
    child.write_text("extends: base.yaml\ntrain: {steps: 20}\n")
    config = load_config(child, ["data.image_size=[512,256]", "train.schedule.base_lr=1e-3", "data.train.annotations=a.json"])
    assert config.train.steps == 20 and config.train.batch_size == 4 and config.model.backbone.name == "resnet18"
    assert config.data.image_size == [512, 256] and config.train.schedule.base_lr == 0.001
    assert config.data.train.annotations == "a.json"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)


def test_public_key_names_exist():
    public = """data.train.annotations data.train.images data.val.annotations data.val.images data.image_size
    data.max_boxes data.label_mapping model.num_classes model.backbone.name train.batch_size train.steps
    train.log_every train.checkpoint_every train.eval_every train.precision train.output_dir runtime.device
    runtime.num_devices""".split()
    assert set(public) <= set(all_keys())


def write(tmp_path, text, name="config.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


CASES = [
    # (file text or None for no file, overrides, expected stderr line after "error: {where}")
    ("train: {stepz: 3}\n", [], "unknown config key 'train.stepz'; did you mean 'train.steps'?"),
    ("", ["model.num_clases=3"], "unknown config key 'model.num_clases'; did you mean 'model.num_classes'?"),
    ("", ["train.steps=abc"], "train.steps must be an integer, got 'abc'"),
    ("", ["data.image_size=640"], "data.image_size must be a list of an integer, got 640"),
    ("", ["train.precision=fp16"], "train.precision must be one of bf16, fp32, got 'fp16'"),
    ("", ["train.batch_size=0"], "train.batch_size must be > 0, got 0"),
    ("", ["data.augmentation.scale_min=3"], "data.augmentation.scale_max must be >= scale_min (3.0), got 2.0"),
    # Values each section refused only late, with a traceback, or never.
    (
        "",
        ["model.matcher.positive_threshold=0.3", "model.matcher.negative_threshold=0.6"],
        "model.matcher.negative_threshold must be in [0, positive_threshold (0.3)], got 0.6",
    ),
    ("", ["loss.focal_gamma=-1"], "loss.focal_gamma must be >= 0, got -1.0"),
    ("", ["model.head.convs=-1"], "model.head.convs must be >= 0, got -1"),
    ("", ["train.optimizer.momentum=5"], "train.optimizer.momentum must be in [0, 1), got 5.0"),
    ("", ["eval.score_threshold=2"], "eval.score_threshold must be in [0, 1], got 2.0"),
    ("", ["model.backbone.norm=batch"], "model.backbone.norm must be one of frozen_bn, bn, cross_replica_bn, gn, got 'batch'"),
    ("", ["train.schedule.decay_steps=[5,3]"], "train.schedule.decay_steps must be increasing positive steps, got [5, 3]"),
    ("train: [1, 2\n", [], "not valid YAML at line 2"),
    ("extends: missing.yaml\n", [], "config file does not exist"),
    (
        "",
        ["runtime.profile_steps=[3,2]"],
        "runtime.profile_steps must be [first, last] with 1 <= first <= last, or null, got [3, 2]",
    ),
    # From the reliability probe: each ended in a traceback, hours of memory, or a huge line.
    ("", [f"train.steps={10**30}"], f"train.steps must be an integer of at most 2**53, got {10**30}"),
    (
        "",
        [f"train.seed={10**400}"],
        "train.seed must be an integer of at most 2**53, got 100000000000000000...0000000000000000000",
    ),
    ("", ["data.image_size=[10000,10000]"], "data.image_size must be [height, width] with both in 32..4096, got [10000, 10000]"),
    ("", ["train.optimizer.name=adam"], "train.optimizer.name must be one of sgd, adamw, got 'adam'"),
    ("", ["train.optimizer.betas=[0.9]"], "train.optimizer.betas must be two values in [0, 1), got [0.9]"),
    ("", ["data.max_boxes=100000000"], "data.max_boxes must be in 1..100000 or auto, got 100000000"),
    (
        "",
        ["model.head.norm=gn", "model.fpn_channels=50"],
        "model.fpn_channels must be a multiple of 32 with model.head.norm gn (its GroupNorm's groups), got 50",
    ),
    ("", ["model.num_classes=1000000000"], "model.num_classes must be in 1..10000, got 1000000000"),
    (
        "",
        ["model.trainable=[]"],
        "model.trainable must be a non-empty list of backbone, fpn, head (something must train), got []",
    ),
    ("train: " + "[" * 100_000 + "]" * 100_000 + "\n", [], "nested too deeply to be a config"),
    ("# " + "x" * 2**20 + "\n", [], f"{2**20 + 3:,} bytes, more than a config file's {2**20:,}"),
    # A 9**9-item alias bomb under a key that wants a string: quoted in a few characters.
    (
        "train:\n  output_dir:\n    - &g0 [x, x, x, x, x, x, x, x, x]\n"
        + "".join(f"    - &g{n} [{', '.join([f'*g{n - 1}'] * 9)}]\n" for n in range(1, 9)),
        [],
        "train.output_dir must be a string, got [['x', 'x', 'x', 'x', 'x', 'x', ...], [[...], [...], [...], [...], [...], [...], ...], [[...], [...], [...], [...], [...",
    ),
]


@pytest.mark.parametrize("text,overrides,message", CASES)
def test_config_mistakes_give_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch, text, overrides, message):
    path = write(tmp_path, text)
    args = ["train", path] + [a for o in overrides for a in ("--set", o)]
    result = run_cli(capsys, monkeypatch, *args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith(message), result.stderr
    assert "Traceback" not in result.stderr


def test_missing_config_file(tmp_path, capsys, monkeypatch):
    result = run_cli(capsys, monkeypatch, "train", tmp_path / "nope.yaml")
    assert result.exit_code == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: config file does not exist"


def test_set_without_equals(tmp_path, capsys, monkeypatch):
    result = run_cli(capsys, monkeypatch, "train", write(tmp_path, ""), "--set", "train.steps")
    assert result.exit_code == 2 and result.stderr.strip() == "error: --set train.steps: expected key=value"


@pytest.mark.xla
def test_more_xla_cpu_devices_than_cores_is_one_line_not_a_rendezvous_abort(tmp_path, capsys, monkeypatch):
    import os

    too_many = len(os.sched_getaffinity(0)) + 1
    result = run_cli(
        capsys, monkeypatch, "bench", CONFIGS / "smoke.yaml", "--devices", str(too_many), "--set", f"train.batch_size={too_many}"
    )
    assert result.exit_code == 2 and result.stderr.strip() == (
        f"error: runtime.num_devices {too_many}: the XLA CPU client runs each device as a thread, at most one per core "
        f"({too_many - 1} here); use --devices {too_many - 1} or fewer"
    )


def test_batch_not_divisible_by_replicas(tmp_path, capsys, monkeypatch):
    result = run_cli(
        capsys, monkeypatch, "train", write(tmp_path, ""), "--set", "train.batch_size=3", "--set", "runtime.num_devices=2"
    )
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: train.batch_size 3 is not divisible by the 2 replicas"
    # bench checks the same before starting anything; --devices is runtime.num_devices.
    bench = run_cli(capsys, monkeypatch, "bench", write(tmp_path, ""), "--devices", "2", "--set", "train.batch_size=3")
    assert bench.exit_code == 2
    assert bench.stderr.strip() == "error: train.batch_size 3 is not divisible by the 2 replicas"


def test_missing_dataset_and_too_few_classes(tmp_path, capsys, monkeypatch):
    config = write(tmp_path, f"train: {{output_dir: {tmp_path / 'out'}}}\n")
    missing = run_cli(
        capsys,
        monkeypatch,
        "train",
        config,
        "--set",
        f"data.train.annotations={tmp_path / 'a.json'}",
        "--set",
        f"data.train.images={tmp_path}",
    )
    assert missing.exit_code == 2 and missing.stderr.strip() == f"error: {tmp_path / 'a.json'}: annotation file does not exist"
    few = run_cli(
        capsys, monkeypatch, "train", CONFIGS / "smoke.yaml", "--set", "model.num_classes=2", "--output", tmp_path / "few"
    )
    assert few.exit_code == 2
    assert (
        few.stderr.strip().startswith("error: model.num_classes is 2 but")
        and "needs 4 with data.label_mapping contiguous" in few.stderr
    )


def test_a_training_set_smaller_than_one_batch_is_one_line(tmp_path, capsys, monkeypatch):
    few = run_cli(
        capsys,
        monkeypatch,
        "train",
        CONFIGS / "smoke.yaml",
        "--output",
        tmp_path / "run",
        "--set",
        "data.synthetic.train_images=4",
        "--set",
        "data.image_size=[64,64]",
    )
    assert few.exit_code == 2 and "Traceback" not in few.stderr
    assert few.stderr.strip().splitlines()[-1] == (
        "error: the training set has 4 usable images, fewer than one global batch of 8: lower train.batch_size or add images"
    )


def test_extends_cycle_is_reported(tmp_path):
    write(tmp_path, "extends: b.yaml\n", "a.yaml")
    write(tmp_path, "extends: a.yaml\n", "b.yaml")
    with pytest.raises(ConfigError, match="'extends' forms a cycle"):
        load_config(tmp_path / "a.yaml")


def test_configuration_doc_lists_every_key_with_its_default():
    text = (CONFIGS.parent / "docs" / "configuration.md").read_text()
    defaults = load_config().to_dict()
    for key in all_keys():
        assert f"`{key}`" in text, f"docs/configuration.md does not document {key}"
        value = defaults
        for part in key.split("."):
            value = value[part]
        row = next(line for line in text.splitlines() if line.startswith((f"| `{key}`", f"| **`{key}`**")))
        if isinstance(value, (bool, type(None))):
            assert f"`{str(value).lower() if value is not None else 'null'}`" in row, row
        elif isinstance(value, (int, float, str)):
            spellings = {f"`{value}`"} | ({f"`{value:g}`"} if isinstance(value, float) else set())
            assert any(s in row for s in spellings), row


def test_an_unknown_backbone_is_one_line_and_exit_code_2(tmp_path, capsys, monkeypatch):
    """Backbone names are checked where they are defined (models.bodies), when the model is built."""
    result = run_cli(capsys, monkeypatch, "bench", write(tmp_path, ""), "--set", "model.backbone.name=resnet42")
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: model: backbone must be one of " + ", ".join(BACKBONES) + ", got 'resnet42'"
    ]


def test_a_missing_weights_file_stops_train_before_anything_is_written(tmp_path, capsys, monkeypatch):
    config = write(tmp_path, "model: {backbone: {name: resnet18}}\n")
    for key, message in (
        ("model.backbone.weights", f"model: backbone weights file {tmp_path / 'missing.pth'} does not exist"),
        ("model.init_from", f"model.init_from {tmp_path / 'missing.pth'}: no such file or directory"),
    ):
        result = run_cli(
            capsys, monkeypatch, "train", config, "--output", tmp_path / "run", "--set", f"{key}={tmp_path / 'missing.pth'}"
        )
        assert result.exit_code == 2 and result.stderr.strip() == f"error: {message}"
        assert not (tmp_path / "run").exists()  # no config.yaml, no synthetic dataset


def test_overwrite_goes_with_no_resume(tmp_path, capsys, monkeypatch):
    result = run_cli(capsys, monkeypatch, "train", write(tmp_path, ""), "--output", tmp_path / "run", "--overwrite")
    assert result.exit_code == 2 and result.stderr.strip() == "error: --overwrite starts over: it goes with --no-resume"
    assert not (tmp_path / "run").exists()


def test_a_model_with_nothing_left_to_train_is_one_line(tmp_path, capsys, monkeypatch):
    """Only the backbone trains, and all of it is frozen: refused before the first step."""
    result = run_cli(
        capsys,
        monkeypatch,
        "train",
        CONFIGS / "smoke.yaml",
        "--output",
        tmp_path / "run",
        *set_options(
            ["model.trainable=[backbone]", "model.backbone.freeze_at=5", "runtime.device=cpu", "data.synthetic.train_images=8"]
        ),
    )
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: model.trainable ['backbone'] with model.backbone.freeze_at 5 leaves no parameter to train: "
        "add fpn or head to model.trainable, or lower freeze_at"
    )


@pytest.mark.parametrize("devices", ["0", "-1"])
def test_a_devices_count_below_one_is_one_line(tmp_path, capsys, monkeypatch, devices):
    result = run_cli(capsys, monkeypatch, "train", CONFIGS / "smoke.yaml", "--output", tmp_path / "run", "--devices", devices)
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.strip().endswith(f"runtime.num_devices must be >= 1 or null, got {devices}")


def test_a_config_name_with_a_typo_gets_the_nearest_file(capsys, monkeypatch):
    result = run_cli(capsys, monkeypatch, "train", CONFIGS / "smoke.yml")
    assert result.exit_code == 2
    assert (
        result.stderr.strip()
        == f"error: {CONFIGS / 'smoke.yml'}: config file does not exist; did you mean {CONFIGS / 'smoke.yaml'}?"
    )


def test_set_with_a_space_for_the_equals_sign_says_what_it_wants(tmp_path, capsys, monkeypatch):
    result = run_cli(capsys, monkeypatch, "train", write(tmp_path, ""), "--set", "train.steps", "10")
    assert (
        result.exit_code == 2 and result.stderr.strip() == "error: --set train.steps: expected key=value (--set train.steps=10?)"
    )
