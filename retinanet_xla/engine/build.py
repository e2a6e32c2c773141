"""Objects from a config: the one place that maps config keys onto constructors."""

from pathlib import Path

from retinanet_xla.config import Config
from retinanet_xla.models import RetinaNet
from retinanet_xla.ops import AnchorGenerator, AnchorMatcher, BoxCoder, DetectionLoss


def build_model(config: Config) -> RetinaNet:
    m = config.model
    anchors = AnchorGenerator(m.anchors.sizes, m.anchors.scales, m.anchors.aspect_ratios, m.anchors.offset, m.anchors.torchvision_rounding)
    return RetinaNet(
        num_classes=m.num_classes,
        depth=m.backbone.depth,
        fpn_channels=m.fpn_channels,
        head_convs=m.head.convs,
        head_norm=m.head.norm,
        backbone_norm=m.backbone.norm,
        freeze_at=m.backbone.freeze_at,
        backbone_weights=Path(m.backbone.weights) if m.backbone.weights else None,
        anchor_generator=anchors,
        prior_probability=m.head.prior_probability,
    )


def build_loss(config: Config) -> DetectionLoss:
    m, loss = config.model, config.loss
    matcher = AnchorMatcher(
        m.matcher.positive_threshold, m.matcher.negative_threshold, m.matcher.allow_low_quality_matches, m.matcher.crowd_ioa_threshold
    )
    return DetectionLoss(
        m.num_classes,
        matcher=matcher,
        box_coder=BoxCoder(m.box_coder_weights),
        focal_alpha=loss.focal_alpha,
        focal_gamma=loss.focal_gamma,
        box_loss=loss.box_loss,
        box_loss_beta=loss.box_loss_beta,
        box_loss_weight=loss.box_loss_weight,
        normalizer_momentum=loss.normalizer_momentum,
    )
