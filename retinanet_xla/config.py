"""Typed configuration: YAML files validated against dataclasses with a default for every key.

A config file may name a base with ``extends: other.yaml`` (relative to the file); the command
line overrides any key with ``--set a.b=value`` (the value is parsed as YAML: ``[512,512]``,
``1e-3``, ``true``). Every mistake raises ``ConfigError`` with one line naming the key or file.
"""

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import yaml

from retinanet_xla.data.transforms import Augmentation
from retinanet_xla.errors import ConfigError
from retinanet_xla.models.bodies import BACKBONES
from retinanet_xla.ops.postprocess import PostprocessConfig


@dataclass
class SplitConfig:
    annotations: Optional[str] = None  # COCO instances JSON; unset = the built-in synthetic dataset
    images: Optional[str] = None  # directory the JSON's file names are relative to


@dataclass
class SyntheticConfig:
    train_images: int = 256
    val_images: int = 64
    seed: int = 0


@dataclass
class DataConfig:
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    image_size: List[int] = field(default_factory=lambda: [640, 640])  # [height, width]
    max_boxes: int = 100
    label_mapping: str = "contiguous"  # contiguous | raw
    augmentation: Augmentation = field(default_factory=Augmentation)
    num_workers: int = 4


@dataclass
class BackboneConfig:
    name: str = "resnet50"  # any of BACKBONES (docs/models.md)
    norm: str = "frozen_bn"  # frozen_bn | bn | cross_replica_bn | gn
    freeze_at: int = 2
    weights: Optional[str] = None  # the ImageNet .pth torchvision publishes for that network


@dataclass
class HeadConfig:
    convs: int = 4
    norm: str = "none"  # none | gn
    prior_probability: float = 0.01


@dataclass
class AnchorConfig:
    sizes: List[float] = field(default_factory=lambda: [32.0, 64.0, 128.0, 256.0, 512.0])
    scales: List[float] = field(default_factory=lambda: [1.0, 2 ** (1 / 3), 2 ** (2 / 3)])
    aspect_ratios: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    offset: float = 0.5
    torchvision_rounding: bool = False


@dataclass
class MatcherConfig:
    positive_threshold: float = 0.5
    negative_threshold: float = 0.5
    allow_low_quality_matches: bool = True
    crowd_ioa_threshold: float = 0.5


@dataclass
class ModelConfig:
    num_classes: int = 91
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn_channels: int = 256
    head: HeadConfig = field(default_factory=HeadConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    box_coder_weights: List[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    matcher: MatcherConfig = field(default_factory=MatcherConfig)


@dataclass
class LossConfig:
    focal_alpha: float = 0.25
    focal_gamma: float = 1.5
    box_loss: str = "huber"  # smooth_l1 | huber | l1 | giou
    box_loss_beta: float = 0.1
    box_loss_weight: float = 12.5  # the TF recipe's 50 with Keras' mean over the 4 coordinates
    normalizer_momentum: float = 0.0


@dataclass
class OptimizerConfig:
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    weight_decay_norm_and_bias: bool = True  # false excludes norm and bias parameters


@dataclass
class ScheduleConfig:
    base_lr: float = 0.08
    warmup_steps: int = 500
    warmup_start_lr: float = 0.0067
    kind: str = "step"  # step | cosine
    decay_steps: List[int] = field(default_factory=lambda: [53440, 62820])
    decay_factor: float = 0.1
    final_lr_fraction: float = 0.0  # cosine: the lr at the last step, as a fraction of base_lr


@dataclass
class TrainConfig:
    batch_size: int = 64  # global: split over replicas
    steps: int = 67500
    log_every: int = 100
    checkpoint_every: int = 5000
    keep_checkpoints: int = 5  # newest step checkpoints kept (0 = all); best.pt is kept apart
    eval_every: int = 0  # 0 = never; N = every N steps and at the end, keeping best.pt
    precision: str = "bf16"  # bf16 | fp32
    output_dir: str = "runs/retinanet"
    seed: int = 0
    grad_clip_norm: float = 0.0  # 0 = off
    ema_decay: float = 0.0  # exponential moving average of the weights (0 = off; reference 0.9998)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


@dataclass
class EvalConfig(PostprocessConfig):
    """Post-processing knobs (defaults: the reference recipe) plus the evaluation batch."""

    batch_size: int = 8  # global evaluation batch; the last one is padded, never dropped


@dataclass
class RuntimeConfig:
    device: str = "xla"  # xla | cpu | cuda (cpu/cuda: the same loop, eager, for debugging)
    num_devices: Optional[int] = None  # replicas: null = every local XLA device, 1 = in this process
    compile_cache: Optional[str] = "auto"  # persistent XLA compilation cache: auto | a directory | null
    profile_steps: Optional[List[int]] = None  # [first, last]: torch_xla profiler trace of those train steps


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


CHOICES = {
    "data.label_mapping": ("contiguous", "raw"),
    "model.backbone.norm": ("frozen_bn", "bn", "cross_replica_bn", "gn"),
    "model.backbone.name": BACKBONES,
    "model.head.norm": ("none", "gn"),
    "loss.box_loss": ("smooth_l1", "huber", "l1", "giou"),
    "train.precision": ("bf16", "fp32"),
    "train.schedule.kind": ("step", "cosine"),
    "runtime.device": ("xla", "cpu", "cuda"),
}


def all_keys(cls=Config, prefix: str = "") -> List[str]:
    """Every leaf key, dotted: ``data.train.annotations``, ..."""
    keys = []
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        hint = typing.get_type_hints(cls)[f.name]
        keys += all_keys(hint, name + ".") if dataclasses.is_dataclass(hint) else [name]
    return keys


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}: unknown config key '{key}'{hint}")


def _type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(hint) if a is not type(None)) + " or null"
    if origin in (list, List):
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(hint, str(hint))


def _convert(value, hint, key: str, where: str):
    origin = typing.get_origin(hint)
    wrong = ConfigError(f"{where}: {key} must be {_type_name(hint)}, got {value!r}")
    if origin is typing.Union:
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _convert(value, inner, key, where)
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise wrong
        (inner,) = typing.get_args(hint)
        return [_convert(v, inner, key, where) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise wrong from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise wrong
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise wrong
        return value
    raise TypeError(f"unsupported config type {hint}")


def _build(cls, data: Dict[str, Any], prefix: str, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'config'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown_key(prefix + str(key), where)
    values = {}
    for name in names & set(data):
        hint, key = hints[name], prefix + name
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, data[name], key + ".", where)
        else:
            values[name] = _convert(data[name], hint, key, where)
    try:
        return cls(**values)
    except ValueError as error:  # a section's own validation (e.g. Augmentation)
        raise ConfigError(f"{where}: {prefix.rstrip('.')}: {error}") from None


def _merge(base: Dict[str, Any], override: Dict[str, Any]) -> Dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path, chain: Sequence[Path] = ()) -> Dict[str, Any]:
    """The file's mapping with its ``extends`` chain merged in (base first)."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file does not exist")
    if path.resolve() in chain:
        raise ConfigError(f"{path}: 'extends' forms a cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{line}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections")
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'extends' must be a file name, got {base!r}")
    return _merge(_read_yaml(path.parent / base, (*chain, path.resolve())), data)


def parse_override(text: str) -> Dict[str, Any]:
    """``a.b.c=value`` -> ``{"a": {"b": {"c": parsed value}}}``."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text}: expected key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    nested: Dict[str, Any] = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def _check_values(config: Config, where: str) -> None:
    for key, allowed in CHOICES.items():
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        if value not in allowed:
            raise ConfigError(f"{where}: {key} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    positive = {
        "train.batch_size": config.train.batch_size,
        "train.steps": config.train.steps,
        "train.log_every": config.train.log_every,
        "train.checkpoint_every": config.train.checkpoint_every,
        "data.max_boxes": config.data.max_boxes,
        "model.num_classes": config.model.num_classes,
        "model.fpn_channels": config.model.fpn_channels,
        "train.schedule.base_lr": config.train.schedule.base_lr,
        "eval.batch_size": config.eval.batch_size,
        "eval.pre_nms_top_k": config.eval.pre_nms_top_k,
        "eval.max_detections": config.eval.max_detections,
        "eval.max_detections_per_class": config.eval.max_detections_per_class,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{where}: {key} must be > 0, got {value}")
    size = config.data.image_size
    if len(size) != 2 or min(size) < 32:
        raise ConfigError(f"{where}: data.image_size must be [height, width] with both >= 32, got {size}")
    if config.runtime.num_devices is not None and config.runtime.num_devices < 1:
        raise ConfigError(f"{where}: runtime.num_devices must be >= 1 or null, got {config.runtime.num_devices}")
    profile = config.runtime.profile_steps
    if profile is not None and (len(profile) != 2 or not 1 <= profile[0] <= profile[1]):
        raise ConfigError(f"{where}: runtime.profile_steps must be [first, last] with 1 <= first <= last, or null, got {profile}")
    if not 0.0 <= config.train.ema_decay < 1.0:
        raise ConfigError(f"{where}: train.ema_decay must be in [0, 1), got {config.train.ema_decay}")
    if config.train.keep_checkpoints < 0:
        raise ConfigError(f"{where}: train.keep_checkpoints must be >= 0, got {config.train.keep_checkpoints}")
    if config.data.num_workers < 0:
        raise ConfigError(f"{where}: data.num_workers must be >= 0, got {config.data.num_workers}")
    if sorted(config.train.schedule.decay_steps) != config.train.schedule.decay_steps:
        raise ConfigError(f"{where}: train.schedule.decay_steps must be increasing, got {config.train.schedule.decay_steps}")


def load_config(
    path: Optional[Path] = None, overrides: Sequence[str] = (), base: Optional[Dict[str, Any]] = None, where: str = "defaults"
) -> Config:
    """The defaults, then the file (with its ``extends`` chain) or a stored ``base`` mapping
    (a checkpoint's config), then each ``--set`` override."""
    data: Dict[str, Any] = dict(base or {})
    if path is not None:
        data = _read_yaml(Path(path))
        where = str(path)
    for text in overrides:
        data = _merge(data, parse_override(text))
    if overrides:
        where += " with --set " + " ".join(overrides)
    config = _build(Config, data, "", where)
    _check_values(config, where)
    return config


def save_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
