"""What a training step costs in arithmetic, and how much of the device's peak a measured rate
is: FLOPs per training image (forward, loss and backward, as torch's ``FlopCounterMode``
counts them: 2 per multiply-add of convolutions and matrix products; elementwise work is not
counted), TFLOP/s achieved per device, and utilisation against the device's ``Peak``.

The count runs once on the host, on the ``meta`` device: shapes only, no memory and no
arithmetic (a fraction of a second even for R50-FPN at 640 px)."""

import copy
import logging
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from retinanet_xla.config import Config
from retinanet_xla.device.peaks import Peak, given_peak
from retinanet_xla.device.runtime import Runtime
from retinanet_xla.models import build_model
from retinanet_xla.training.build import build_loss

logger = logging.getLogger(__name__)

# The keys every speed report carries (bench's JSON, train's summary.json): docs/performance.md.
UTILISATION_KEYS = (
    "train_flops_per_image",
    "achieved_tflops_per_device",
    "peak_tflops_per_device",
    "peak_source",
    "utilisation",
)


def training_flops(model: nn.Module, loss_of: Callable[[object], Tensor], inputs: Tensor) -> int:
    """FLOPs of one training step's arithmetic on ``inputs``: ``model``'s forward, the loss
    ``loss_of(outputs)`` and the gradients of every parameter that trains (the step's
    ``torch.autograd.grad``; the inputs get none)."""
    params: Sequence[Tensor] = [p for p in model.parameters() if p.requires_grad]
    with FlopCounterMode(display=False) as counter:
        loss = loss_of(model(inputs))
        torch.autograd.grad(loss, params, allow_unused=True)
    return int(counter.get_total_flops())


def training_flops_per_image(config: Config) -> Optional[int]:
    """One image's training FLOPs for the config's model at ``data.image_size``, counted on the
    ``meta`` device (the backbone's weights file is not read: it changes no shape). None, with a
    warning, where the model cannot be counted: utilisation is then not reported, and the run
    goes on."""
    config = copy.deepcopy(config)
    config.model.backbone.weights = None
    try:
        with torch.device("meta"):
            model, loss_fn = build_model(config), build_loss(config)
    except (NotImplementedError, RuntimeError):
        # Some constructors read their own initial values (torchvision's RegNet): built on the
        # host, with the RNG put back as it was (exact resume restores it), then moved.
        with torch.random.fork_rng(devices=[]):
            model, loss_fn = build_model(config).to("meta"), build_loss(config).to("meta")
    try:
        return _count(model.train(), loss_fn.train(), config)
    except (NotImplementedError, RuntimeError, TypeError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        logger.warning("could not count this model's FLOPs (%s); utilisation is not reported", first_line)
        return None


def _count(model: nn.Module, loss_fn: nn.Module, config: Config) -> int:
    height, width = config.data.image_size
    boxes = 1 if config.data.max_boxes == "auto" else config.data.max_boxes  # the matcher's work is not counted
    with torch.device("meta"):
        anchors = model.anchors((height, width))
        images = torch.zeros(1, 3, height, width, dtype=torch.uint8)
        targets = (torch.zeros(1, boxes, 4), torch.zeros(1, boxes, dtype=torch.int64), torch.zeros(1, boxes, dtype=torch.bool))

    def loss_of(outputs) -> Tensor:
        return loss_fn(outputs, anchors, *targets)["loss"]

    return training_flops(_Normalized(model), loss_of, images)


class _Normalized(nn.Module):
    """The model as the step calls it: pixels normalised first (as ``TrainStep.trace``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor):
        return self.model(self.model.normalize(images))


@dataclass(frozen=True)
class Utilisation:
    """A step's FLOPs per image and the device's peak: turns images/s into the report."""

    flops_per_image: Optional[int]  # None: the model could not be counted
    peak: Peak
    replicas: int

    def report(self, images_per_second: Optional[float]) -> Dict:
        """``UTILISATION_KEYS`` for a measured global rate (None: nothing measured yet)."""
        achieved = None
        if images_per_second is not None and self.flops_per_image is not None:
            achieved = images_per_second * self.flops_per_image / self.replicas / 1e12
        utilisation = None
        if achieved is not None and self.peak.tflops:
            utilisation = round(achieved / self.peak.tflops, 4)
        return {
            "train_flops_per_image": self.flops_per_image,
            "achieved_tflops_per_device": None if achieved is None else round(achieved, 6),
            "peak_tflops_per_device": None if self.peak.tflops is None else round(self.peak.tflops, 3),
            "peak_source": self.peak.source,
            "utilisation": utilisation,
        }


def step_utilisation(config: Config, runtime: Runtime) -> Utilisation:
    """The config's step on ``runtime``'s devices: ``runtime.peak_tflops`` when set, else what
    the runtime knows of its device (on a CPU a matmul measured now: call it where the device
    is otherwise idle)."""
    given = config.runtime.peak_tflops
    peak = given_peak(given) if given is not None else runtime.peak(config.train.precision)
    return Utilisation(training_flops_per_image(config), peak, runtime.replicas.world)
