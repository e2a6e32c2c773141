"""The training step's memory, checked before the first step (``models/footprint.py``): a
config whose input size, batch or ``data.max_boxes`` cannot fit is refused in one line."""

from torch import nn

from retinanet_xla.config import Config
from retinanet_xla.device.runtime import Runtime
from retinanet_xla.errors import ConfigError
from retinanet_xla.models.footprint import GIB, training_bytes
from retinanet_xla.training.batches import replica_batch_size


def check_step_memory(model: nn.Module, config: Config, runtime: Runtime, max_boxes: int) -> None:
    """``ConfigError`` when one replica's step needs more than the device can give it
    (``max_boxes``: ``data.max_boxes`` as resolved for the training set)."""
    available = runtime.memory_bytes()
    if available is None:
        return
    batch = replica_batch_size(config, runtime.replicas)
    needed, matcher = training_bytes(model, batch, tuple(config.data.image_size), config.train.precision, max_boxes)
    if needed <= available:
        return
    height, width = config.data.image_size
    if matcher > needed / 2:  # the boxes' part: say so, it is the setting to lower
        raise ConfigError(
            f"data.max_boxes {max_boxes} with {batch} image(s) of [{height}, {width}] per replica needs at least "
            f"{needed / GIB:.1f} GiB for the training step ({matcher / GIB:.1f} GiB of it the anchor matcher's "
            f"[batch, anchors, max_boxes] tables), and {available / GIB:.1f} GiB is available to each replica: lower "
            "data.max_boxes (or drop the images with that many boxes), data.image_size or train.batch_size"
        )
    raise ConfigError(
        f"data.image_size [{height}, {width}] with {batch} image(s) per replica needs at least {needed / GIB:.1f} GiB "
        f"for the training step, and {available / GIB:.1f} GiB is available to each replica: lower data.image_size "
        "or train.batch_size"
    )
