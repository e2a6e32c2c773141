"""A trained model ready for inference, from a checkpoint file or run directory."""

from dataclasses import dataclass
from typing import Dict, Sequence

from retinanet_xla.config import Config, load_config
from retinanet_xla.data.coco import CategoryMapping
from retinanet_xla.distributed.launch import replica_runtime
from retinanet_xla.distributed.replicas import Replicas
from retinanet_xla.models import RetinaNet, build_model
from retinanet_xla.rundir.directory import open_checkpoint
from retinanet_xla.storage import Location
from retinanet_xla.xla.runtime import Runtime


@dataclass
class LoadedModel:
    checkpoint: Location
    step: int
    config: Config
    mapping: CategoryMapping
    runtime: Runtime
    model: RetinaNet
    uses_weight_average: bool


def inference_config(checkpoint: Location, payload: Dict, overrides: Sequence[str] = ()) -> Config:
    """The config the checkpoint was trained with, and ``overrides``."""
    config = load_config(base=payload["config"], overrides=overrides, where=str(checkpoint))
    # The weights come from the checkpoint; the ImageNet file need not exist on this machine.
    config.model.backbone.weights = None
    return config


def load_for_inference(checkpoint: Location, overrides: Sequence[str] = (), replicas: Replicas = Replicas()) -> LoadedModel:
    """The checkpoint's config (with ``overrides``), its weights on this replica's device, in
    eval mode, and the category mapping it was trained with."""
    checkpoint, payload = open_checkpoint(checkpoint)
    config = inference_config(checkpoint, payload, overrides)
    runtime = replica_runtime(config, replicas)
    model = build_model(config)
    # The weight average, when the run kept one, is the model to use (as the TF reference does).
    model.load_state_dict(payload["ema"] if "ema" in payload else payload["model"])
    runtime.place_model(model).eval()
    mapping = CategoryMapping.from_dict(payload["category_mapping"])
    return LoadedModel(checkpoint, payload["step"], config, mapping, runtime, model, "ema" in payload)
