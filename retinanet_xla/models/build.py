"""The model from a config: the one place that maps ``model.*`` keys onto ``RetinaNet``."""

from retinanet_xla import storage
from retinanet_xla.config import Config
from retinanet_xla.errors import ConfigError
from retinanet_xla.models.retinanet import RetinaNet
from retinanet_xla.ops import AnchorGenerator


def build_model(config: Config) -> RetinaNet:
    """Raises ConfigError (one line) for anything the model refuses, e.g. a wrong weights file."""
    try:
        return _build_model(config)
    except ValueError as error:
        raise ConfigError(f"model: {error}") from None


def _build_model(config: Config) -> RetinaNet:
    m = config.model
    anchors = AnchorGenerator(
        m.anchors.sizes, m.anchors.scales, m.anchors.aspect_ratios, m.anchors.offset, m.anchors.torchvision_rounding
    )
    model = RetinaNet(
        num_classes=m.num_classes,
        backbone=m.backbone.name,
        fpn_channels=m.fpn_channels,
        head_convs=m.head.convs,
        head_norm=m.head.norm,
        backbone_norm=m.backbone.norm,
        # A backbone that does not train is frozen whole: its BatchNorm statistics too.
        freeze_at=m.backbone.freeze_at if "backbone" in m.trainable else 5,
        backbone_weights=storage.location(m.backbone.weights) if m.backbone.weights else None,
        anchor_generator=anchors,
        prior_probability=m.head.prior_probability,
        p6_from=m.p6_from,
    )
    for part, module in (("fpn", model.backbone.fpn), ("head", model.head)):
        if part not in m.trainable:
            module.requires_grad_(False)  # the optimizer leaves out parameters without gradient
    return model
