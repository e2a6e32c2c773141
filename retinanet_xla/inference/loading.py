"""A trained model ready for inference, from a checkpoint file or run directory."""

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

from retinanet_xla.config import Config, load_config
from retinanet_xla.data.coco import CategoryMapping
from retinanet_xla.device.choice import create_runtime
from retinanet_xla.device.runtime import Runtime
from retinanet_xla.errors import CheckpointError
from retinanet_xla.models import RetinaNet, build_model
from retinanet_xla.rundir.checkpoint import inference_weights
from retinanet_xla.rundir.directory import open_checkpoint
from retinanet_xla.storage import Location


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
    labels = CategoryMapping.from_dict(payload["category_mapping"]).num_labels  # checked when it was opened
    if config.model.num_classes < labels:
        raise CheckpointError(
            f"{checkpoint}: its category_mapping needs {labels} classes but its config's model.num_classes is "
            f"{config.model.num_classes}; not a retinanet-xla checkpoint"
        )
    return config


def load_for_inference(checkpoint: Location, overrides: Sequence[str] = (), runtime: Optional[Runtime] = None) -> LoadedModel:
    """The checkpoint's config (with ``overrides``), its weights on ``runtime``'s device (by
    default, the config's device in this process), in eval mode, and the category mapping it
    was trained with."""
    checkpoint, payload = open_checkpoint(checkpoint)
    config = inference_config(checkpoint, payload, overrides)
    runtime = runtime or create_runtime(config.runtime)
    model = build_model(config)
    try:
        model.load_state_dict(inference_weights(payload))
    except RuntimeError as error:  # torch's "Error(s) in loading state_dict": the shapes or names
        detail = next((line.strip() for line in str(error).splitlines()[1:] if line.strip()), str(error))
        raise CheckpointError(f"{checkpoint}: its weights do not fit the model its config describes ({detail})") from None
    runtime.place_model(model).eval()
    mapping = CategoryMapping.from_dict(payload["category_mapping"])
    return LoadedModel(checkpoint, payload["step"], config, mapping, runtime, model, "ema" in payload)
