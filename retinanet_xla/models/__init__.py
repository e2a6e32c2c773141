"""Model modules: backbone, FPN, heads and the RetinaNet that assembles them."""

from retinanet_xla.models.backbone import FeaturePyramid, ResNetBody, ResNetFPN
from retinanet_xla.models.head import RetinaNetHead
from retinanet_xla.models.norm import CrossReplicaBatchNorm2d, set_replica_averaging
from retinanet_xla.models.retinanet import RetinaNet

__all__ = ["CrossReplicaBatchNorm2d", "FeaturePyramid", "ResNetBody", "ResNetFPN", "RetinaNet", "RetinaNetHead", "set_replica_averaging"]
