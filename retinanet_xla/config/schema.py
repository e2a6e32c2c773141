"""The config schema: one dataclass per section, each validating its own values where it is
defined (``__post_init__``), so a section built anywhere, from YAML or in Python, is valid.
Imports nothing of the package, so loading a YAML file does not import torch; choices that
belong to a lower layer (the backbone names: torchvision's model zoo) are checked where the
model is built."""

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

from retinanet_xla.errors import shown

# The vocabulary of the config; modules that act on these values import them from here.
LABEL_MAPPINGS = ("contiguous", "raw")
BACKBONE_NORMS = ("frozen_bn", "bn", "cross_replica_bn", "gn")
HEAD_NORMS = ("none", "gn")
BOX_LOSSES = ("smooth_l1", "huber", "l1", "giou")
MODEL_PARTS = ("backbone", "fpn", "head")
P6_INPUTS = ("p5", "c5")
PRECISIONS = ("bf16", "fp32")
SCHEDULES = ("step", "cosine")
OPTIMIZER_NAMES = ("sgd", "adamw")
DEVICES = ("auto", "xla", "tpu", "cuda", "cpu")
# More classes than any detection dataset has (LVIS: 1,203): the head's weights grow with it,
# and a number read from a file must not ask for terabytes.
MAX_CLASSES = 10_000
# Ground-truth slots per image: far past the densest detection datasets (a few thousand objects
# in an image); the matcher's tables grow with it (models/footprint.py checks what fits).
MAX_BOXES = 100_000
HEAD_GROUPS = 32  # the GroupNorm head's groups (model.head.norm: gn), as in the FCOS/ATSS heads
COMPILE_CHOICES = ("auto", True, False)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
STEP_GRAPHS = ("replay", "retrace")
EVAL_BACKENDS = ("pycocotools", "faster-coco-eval")


class InvalidValue(ValueError):
    """A section's field has a value it cannot take; ``_build`` names the full key."""

    def __init__(self, name: str, value: Any, expected: str):
        super().__init__(f"{name} must be {expected}, got {shown(value)}")
        self.name = name


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise InvalidValue(name, value, expected)


def _one_of(name: str, value: Any, choices: Sequence[str]) -> None:
    _require(value in choices, name, value, "one of " + ", ".join(choices))


@dataclass
class SplitConfig:
    annotations: Optional[str] = None  # COCO instances JSON; unset = the built-in synthetic dataset
    images: Optional[str] = None  # directory the JSON's file names are relative to
    records: Optional[str] = None  # instead of both: PREFIX of record shards (data convert --from coco)

    def __post_init__(self):
        _require(
            self.records is None or (self.annotations is None and self.images is None),
            "records",
            self.records,
            "unset when annotations and images are set (one source per split)",
        )


@dataclass
class SyntheticConfig:
    train_images: int = 256
    val_images: int = 64
    seed: int = 0

    def __post_init__(self):
        _require(self.train_images >= 1, "train_images", self.train_images, ">= 1")
        _require(self.val_images >= 1, "val_images", self.val_images, ">= 1")


@dataclass
class Augmentation:
    """Training augmentation knobs. Defaults are the reference recipe's (scale jitter 0.5-2.0,
    horizontal flip) plus mild colour jitter; each strength is the maximum relative change
    (hue: fraction of the colour circle). 0 switches a jitter off."""

    scale_min: float = 0.5
    scale_max: float = 2.0
    hflip_probability: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.02
    min_box_size: float = 1.0  # boxes narrower or shorter than this (pixels) after cropping are dropped

    def __post_init__(self):
        _require(self.scale_min > 0, "scale_min", self.scale_min, "> 0")
        _require(self.scale_max >= self.scale_min, "scale_max", self.scale_max, f">= scale_min ({self.scale_min})")
        _require(0 <= self.hflip_probability <= 1, "hflip_probability", self.hflip_probability, "in [0, 1]")
        for name in ("brightness", "contrast", "saturation"):
            _require(0 <= getattr(self, name) < 1, name, getattr(self, name), "in [0, 1)")
        _require(0 <= self.hue <= 0.5, "hue", self.hue, "in [0, 0.5]")
        _require(self.min_box_size >= 0, "min_box_size", self.min_box_size, ">= 0")


@dataclass
class DataConfig:
    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    image_size: List[int] = field(default_factory=lambda: [640, 640])  # [height, width]
    max_boxes: Union[int, str] = 100  # ground-truth boxes per image in a batch; auto: the training set's most, rounded up to 8s
    label_mapping: str = "contiguous"  # contiguous | raw
    augmentation: Augmentation = field(default_factory=Augmentation)
    num_workers: int = 4
    max_pixels: int = 100_000_000  # larger images are refused from their header, before decoding (a bomb guard)

    def __post_init__(self):
        size = self.image_size
        # Larger inputs than any TPU recipe's grow the host's batches past memory (10000x10000:
        # over 7 GiB before the first step).
        _require(
            len(size) == 2 and 32 <= min(size) and max(size) <= 4096, "image_size", size, "[height, width] with both in 32..4096"
        )
        _require(
            self.max_boxes == "auto" or (isinstance(self.max_boxes, int) and 0 < self.max_boxes <= MAX_BOXES),
            "max_boxes",
            self.max_boxes,
            f"in 1..{MAX_BOXES} or auto",
        )
        _one_of("label_mapping", self.label_mapping, LABEL_MAPPINGS)
        _require(self.num_workers >= 0, "num_workers", self.num_workers, ">= 0")
        _require(self.max_pixels >= 1, "max_pixels", self.max_pixels, ">= 1")


@dataclass
class BackboneConfig:
    name: str = "resnet50"  # any of models.BACKBONES (docs/models.md); checked when the model is built
    norm: str = "frozen_bn"  # frozen_bn | bn | cross_replica_bn | gn
    freeze_at: int = 2
    weights: Optional[str] = None  # the ImageNet .pth torchvision publishes for that network

    def __post_init__(self):
        _one_of("norm", self.norm, BACKBONE_NORMS)
        _require(0 <= self.freeze_at <= 5, "freeze_at", self.freeze_at, "in [0, 5] (stem, then the 4 stages)")


@dataclass
class HeadConfig:
    convs: int = 4
    norm: str = "none"  # none | gn
    prior_probability: float = 0.01

    def __post_init__(self):
        _require(self.convs >= 0, "convs", self.convs, ">= 0")
        _one_of("norm", self.norm, HEAD_NORMS)
        _require(0 < self.prior_probability < 1, "prior_probability", self.prior_probability, "in (0, 1)")


@dataclass
class AnchorConfig:
    sizes: List[float] = field(default_factory=lambda: [32.0, 64.0, 128.0, 256.0, 512.0])
    scales: List[float] = field(default_factory=lambda: [1.0, 2 ** (1 / 3), 2 ** (2 / 3)])
    aspect_ratios: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    offset: float = 0.5
    torchvision_rounding: bool = False

    def __post_init__(self):
        _require(len(self.sizes) == 5 and min(self.sizes) > 0, "sizes", self.sizes, "5 positive sizes (P3-P7)")
        _require(len(self.scales) > 0 and min(self.scales) > 0, "scales", self.scales, "a non-empty list of positive numbers")
        ratios = self.aspect_ratios
        _require(len(ratios) > 0 and min(ratios) > 0, "aspect_ratios", ratios, "a non-empty list of positive numbers")
        _require(0 <= self.offset <= 1, "offset", self.offset, "in [0, 1]")


@dataclass
class MatcherConfig:
    positive_threshold: float = 0.5
    negative_threshold: float = 0.5
    allow_low_quality_matches: bool = True
    crowd_ioa_threshold: float = 0.5

    def __post_init__(self):
        _require(0 < self.positive_threshold <= 1, "positive_threshold", self.positive_threshold, "in (0, 1]")
        expected = f"in [0, positive_threshold ({self.positive_threshold})]"
        _require(0 <= self.negative_threshold <= self.positive_threshold, "negative_threshold", self.negative_threshold, expected)
        _require(0 < self.crowd_ioa_threshold <= 1, "crowd_ioa_threshold", self.crowd_ioa_threshold, "in (0, 1]")


@dataclass
class ModelConfig:
    num_classes: int = 91
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    fpn_channels: int = 256
    p6_from: str = "p5"  # p5 (torchvision v1, the TF recipe) | c5 (torchvision v2, detectron2)
    head: HeadConfig = field(default_factory=HeadConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    box_coder_weights: List[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    # A trained detector to start from (docs/models.md, "Fine-tuning"): a retinanet-xla
    # checkpoint or run directory, or a torchvision RetinaNet state-dict file. Fresh runs only.
    init_from: Optional[str] = None
    init_class_map: Dict[str, str] = field(default_factory=dict)  # target class name -> source class name or id
    trainable: List[str] = field(default_factory=lambda: list(MODEL_PARTS))  # the parts that train

    def __post_init__(self):
        _require(0 < self.num_classes <= MAX_CLASSES, "num_classes", self.num_classes, f"in 1..{MAX_CLASSES}")
        parts = self.trainable
        _require(
            bool(parts) and set(parts) <= set(MODEL_PARTS) and len(set(parts)) == len(parts),
            "trainable",
            parts,
            "a non-empty list of " + ", ".join(MODEL_PARTS) + " (something must train)",
        )
        _require(
            not self.init_class_map or self.init_from is not None,
            "init_class_map",
            self.init_class_map,
            "empty unless init_from is set",
        )
        _require(self.fpn_channels > 0, "fpn_channels", self.fpn_channels, "> 0")
        _require(
            self.head.norm != "gn" or self.fpn_channels % HEAD_GROUPS == 0,
            "fpn_channels",
            self.fpn_channels,
            f"a multiple of {HEAD_GROUPS} with model.head.norm gn (its GroupNorm's groups)",
        )
        _one_of("p6_from", self.p6_from, P6_INPUTS)
        weights = self.box_coder_weights
        _require(len(weights) == 4 and min(weights) > 0, "box_coder_weights", weights, "4 positive numbers (x, y, w, h)")


@dataclass
class LossConfig:
    focal_alpha: float = 0.25
    focal_gamma: float = 1.5
    box_loss: str = "huber"  # smooth_l1 | huber | l1 | giou
    box_loss_beta: float = 0.1
    box_loss_weight: float = 12.5  # the TF recipe's 50 with Keras' mean over the 4 coordinates
    normalizer_momentum: float = 0.0

    def __post_init__(self):
        _require(self.focal_alpha <= 1, "focal_alpha", self.focal_alpha, "in [0, 1] (or negative: no class balancing)")
        _require(self.focal_gamma >= 0, "focal_gamma", self.focal_gamma, ">= 0")
        _one_of("box_loss", self.box_loss, BOX_LOSSES)
        if self.box_loss == "huber":
            _require(self.box_loss_beta > 0, "box_loss_beta", self.box_loss_beta, "> 0 for huber")
        _require(self.box_loss_beta >= 0, "box_loss_beta", self.box_loss_beta, ">= 0")
        _require(self.box_loss_weight >= 0, "box_loss_weight", self.box_loss_weight, ">= 0")
        _require(0 <= self.normalizer_momentum < 1, "normalizer_momentum", self.normalizer_momentum, "in [0, 1)")


@dataclass
class OptimizerConfig:
    name: str = "sgd"  # sgd | adamw
    momentum: float = 0.9  # sgd
    nesterov: bool = True  # sgd
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    eps: float = 1e-8  # adamw
    weight_decay: float = 1e-4  # sgd: L2 on the gradient; adamw: decoupled, p *= 1 - lr * wd
    weight_decay_norm_and_bias: bool = True  # false excludes norm and bias parameters

    def __post_init__(self):
        _one_of("name", self.name, OPTIMIZER_NAMES)
        _require(0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)")
        _require(len(self.betas) == 2 and all(0 <= beta < 1 for beta in self.betas), "betas", self.betas, "two values in [0, 1)")
        _require(self.eps > 0, "eps", self.eps, "> 0")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")


@dataclass
class ScheduleConfig:
    base_lr: float = 0.08
    warmup_steps: int = 500
    warmup_start_lr: float = 0.0067
    kind: str = "step"  # step | cosine
    decay_steps: List[int] = field(default_factory=lambda: [53440, 62820])
    decay_factor: float = 0.1
    final_lr_fraction: float = 0.0  # cosine: the lr at the last step, as a fraction of base_lr

    def __post_init__(self):
        _require(self.base_lr > 0, "base_lr", self.base_lr, "> 0")
        _require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, ">= 0")
        _require(self.warmup_start_lr >= 0, "warmup_start_lr", self.warmup_start_lr, ">= 0")
        _one_of("kind", self.kind, SCHEDULES)
        steps = self.decay_steps
        _require(sorted(steps) == steps and all(s > 0 for s in steps), "decay_steps", steps, "increasing positive steps")
        _require(0 < self.decay_factor <= 1, "decay_factor", self.decay_factor, "in (0, 1]")
        _require(0 <= self.final_lr_fraction <= 1, "final_lr_fraction", self.final_lr_fraction, "in [0, 1]")


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

    def __post_init__(self):
        for name in ("batch_size", "steps", "log_every", "checkpoint_every"):
            _require(getattr(self, name) > 0, name, getattr(self, name), "> 0")
        _require(self.keep_checkpoints >= 0, "keep_checkpoints", self.keep_checkpoints, ">= 0")
        _require(self.eval_every >= 0, "eval_every", self.eval_every, ">= 0")
        _one_of("precision", self.precision, PRECISIONS)
        _require(self.grad_clip_norm >= 0, "grad_clip_norm", self.grad_clip_norm, ">= 0")
        _require(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "in [0, 1)")


@dataclass
class PostprocessConfig:
    """Detections from the head's outputs; the defaults are the reference recipe's."""

    pre_nms_top_k: int = 5000
    score_threshold: float = 0.05
    nms_iou: float = 0.5
    max_detections_per_class: int = 100
    max_detections: int = 100

    def __post_init__(self):
        for name in ("pre_nms_top_k", "max_detections_per_class", "max_detections"):
            _require(getattr(self, name) > 0, name, getattr(self, name), "> 0")
        _require(0 <= self.score_threshold <= 1, "score_threshold", self.score_threshold, "in [0, 1]")
        _require(0 < self.nms_iou <= 1, "nms_iou", self.nms_iou, "in (0, 1]")


@dataclass
class EvalConfig(PostprocessConfig):
    """Post-processing knobs plus the evaluation batch."""

    batch_size: int = 8  # global evaluation batch; the last one is padded, never dropped
    backend: str = "pycocotools"  # pycocotools | faster-coco-eval (the same numbers, faster)

    def __post_init__(self):
        super().__post_init__()
        _require(self.batch_size > 0, "batch_size", self.batch_size, "> 0")
        _one_of("backend", self.backend, EVAL_BACKENDS)


@dataclass
class RuntimeConfig:
    # auto | xla (torch-xla) | tpu (TorchTPU) | cuda | cpu. auto: xla with PJRT_DEVICE set, else
    # TorchTPU on a TPU VM that has it, else torch-xla on a TPU VM that has it, else cuda, else cpu
    device: str = "auto"
    num_devices: Optional[int] = None  # replicas: null = every local device, 1 = in this process
    # native devices (cpu, cuda, tpu): the whole train step as one torch.compile graph. auto: on
    # for cuda and tpu, off for cpu (docs/performance.md, "Native backend")
    compile: Union[bool, str] = "auto"
    # torch.compile's mode for the train step: reduce-overhead captures it as CUDA graphs on
    # CUDA (docs/performance.md, "GPU benchmark"); default until a GPU measurement says otherwise
    compile_mode: str = "default"
    compile_cache: Optional[str] = "auto"  # persistent XLA compilation cache: auto | a directory | null
    profile_steps: Optional[List[int]] = None  # [first, last]: a profiler trace of those train steps
    step_graph: str = "replay"  # replay: trace the train step once, then rerun its graph | retrace: trace every step
    # XLA's CPU client only: 1x1 and small-output convolutions as matrix products, which it runs
    # faster (docs/performance.md, "XLA:CPU kernel rewrites"); TPUs and native devices ignore it
    xla_cpu_kernels: bool = True
    # The device's peak TFLOP/s in the step's precision, for utilisation: null = the table of
    # datasheet peaks, or on a CPU a matmul measured in the same run (docs/performance.md)
    peak_tflops: Optional[float] = None

    def __post_init__(self):
        _one_of("device", self.device, DEVICES)
        _require(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops", self.peak_tflops, "> 0 or null")
        _require(self.compile in COMPILE_CHOICES, "compile", self.compile, "auto, true or false")
        _one_of("compile_mode", self.compile_mode, COMPILE_MODES)
        _one_of("step_graph", self.step_graph, STEP_GRAPHS)
        _require(self.num_devices is None or self.num_devices >= 1, "num_devices", self.num_devices, ">= 1 or null")
        profile = self.profile_steps
        valid = profile is None or (len(profile) == 2 and 1 <= profile[0] <= profile[1])
        _require(valid, "profile_steps", profile, "[first, last] with 1 <= first <= last, or null")


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


__all__ = [
    "AnchorConfig",
    "Augmentation",
    "BACKBONE_NORMS",
    "BOX_LOSSES",
    "BackboneConfig",
    "Config",
    "COMPILE_CHOICES",
    "COMPILE_MODES",
    "DEVICES",
    "DataConfig",
    "EVAL_BACKENDS",
    "EvalConfig",
    "HEAD_GROUPS",
    "HEAD_NORMS",
    "HeadConfig",
    "InvalidValue",
    "LABEL_MAPPINGS",
    "LossConfig",
    "MODEL_PARTS",
    "MatcherConfig",
    "ModelConfig",
    "OptimizerConfig",
    "P6_INPUTS",
    "PRECISIONS",
    "PostprocessConfig",
    "RuntimeConfig",
    "SCHEDULES",
    "ScheduleConfig",
    "SplitConfig",
    "SyntheticConfig",
    "TrainConfig",
]
