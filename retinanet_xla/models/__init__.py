"""Model modules: backbone bodies, FPN, heads and the RetinaNet that assembles them."""

from retinanet_xla.models.backbone import BackboneWithFPN, FeaturePyramid
from retinanet_xla.models.bodies import BACKBONES, ClassifierBody
from retinanet_xla.models.build import build_model
from retinanet_xla.models.head import RetinaNetHead
from retinanet_xla.models.norm import CrossReplicaBatchNorm2d, set_replica_averaging
from retinanet_xla.models.retinanet import RetinaNet

__all__ = [
    "BACKBONES",
    "BackboneWithFPN",
    "ClassifierBody",
    "CrossReplicaBatchNorm2d",
    "FeaturePyramid",
    "RetinaNet",
    "RetinaNetHead",
    "build_model",
    "set_replica_averaging",
]
