"""Starting a fresh run from a trained detector (``model.init_from``), also one trained on other
classes: torchvision's COCO RetinaNet for a user's own few hundred images.

Every tensor whose name and shape match is loaded. The classification output layer
(``head.classification_head.cls_logits``) is the one tensor whose shape follows the classes:
when the class count differs it keeps the new model's initialisation (the focal-loss prior),
and ``model.init_class_map`` copies the trained rows of the classes it names. Anything else
that does not fit (another backbone, another FPN width) is a one-line error naming the first
mismatch: loading half a backbone would train silently from a broken start.
"""

import io
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from retinanet_xla import storage
from retinanet_xla.errors import CheckpointError, ConfigError
from retinanet_xla.models import RetinaNet
from retinanet_xla.rundir.checkpoint import check_payload, is_checkpoint_payload
from retinanet_xla.rundir.directory import open_checkpoint

CLASS_OUTPUT = "head.classification_head.cls_logits"


@dataclass
class InitReport:
    source: storage.Location
    loaded: int = 0
    reinitialised: List[str] = field(default_factory=list)
    unused: int = 0
    carried_classes: List[Tuple[str, str]] = field(default_factory=list)  # (target, source)

    def line(self) -> str:
        text = (
            f"init_from {self.source}: loaded {self.loaded} tensors, re-initialised {len(self.reinitialised)} "
            f"({', '.join(self.reinitialised) or 'none'}), {self.unused} in the file unused"
        )
        if self.carried_classes:
            text += "; classes carried over: " + ", ".join(f"{target} <- {source}" for target, source in self.carried_classes)
        return text


def read_source(path: storage.Location) -> Tuple[Dict[str, Tensor], Optional[List[str]], Optional[Dict[str, int]]]:
    """The file's state dict, its class names by label (None when unknown), and the label of
    each category id it knows. A retinanet-xla checkpoint or run directory carries its own
    category mapping (the weight average when it kept one); a torchvision state dict is taken
    as the COCO model (91 labels, the raw category ids), whose names torchvision ships."""
    if storage.is_dir(path):
        _, payload = open_checkpoint(path)
    else:
        payload = None
        try:  # read once: either one of our checkpoints or a plain state dict
            state = torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ConfigError(f"model.init_from {path}: no such file or directory") from None
        except Exception as error:  # anything weights_only refuses, a truncated file
            raise CheckpointError(f"{path}: not a readable state dict ({type(error).__name__})") from None
        if is_checkpoint_payload(state):
            payload = check_payload(path, state)
    if payload is not None:
        mapping = payload["category_mapping"]
        names = {int(k): v for k, v in mapping["names"].items()}
        ids = [int(i) for i in mapping["category_ids"]]
        if mapping["mode"] == "raw":
            labels = {i: i for i in ids}
            by_label = [names.get(label, str(label)) for label in range(max(ids) + 1)]
        else:
            labels = {i: label for label, i in enumerate(ids)}
            by_label = [names.get(i, str(i)) for i in ids]
        return payload.get("ema", payload["model"]), by_label, labels
    if not (isinstance(state, dict) and state and all(isinstance(v, Tensor) for v in state.values())):
        raise CheckpointError(
            f"{path}: not a state dict of tensors (a torchvision RetinaNet .pth, or a retinanet-xla checkpoint)"
        )
    names = None
    if state.get(f"{CLASS_OUTPUT}.bias") is not None and state[f"{CLASS_OUTPUT}.bias"].numel() == 9 * 91:
        from torchvision.models.detection.retinanet import RetinaNet_ResNet50_FPN_Weights

        names = list(RetinaNet_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
    return state, names, None  # torchvision's labels are COCO's category ids


def initialize_from(
    model: RetinaNet, path: storage.Location, target_names: List[str], class_map: Dict[str, str], num_anchors: int
) -> InitReport:
    """Load ``path`` into ``model`` (on the host, before it moves to the device)."""
    state, source_names, source_labels = read_source(path)
    report = InitReport(storage.location(path))
    target = model.state_dict()
    parameters = {name for name, _ in model.named_parameters()}
    loaded: Dict[str, Tensor] = {}
    for name, value in target.items():
        found = state.get(name)
        if found is not None and found.shape == value.shape:
            loaded[name] = found
        elif name.startswith(CLASS_OUTPUT):
            report.reinitialised.append(name)
        elif name in parameters:
            have = "missing" if found is None else f"shape {tuple(found.shape)}"
            raise ConfigError(
                f"model.init_from {path}: {name} is {have} in the file but {tuple(value.shape)} in this model "
                "(another backbone, FPN width or head depth?)"
            )
    report.loaded = len(loaded)
    report.unused = len(set(state) - set(loaded))
    model.load_state_dict(loaded, strict=False)
    if class_map:
        report.carried_classes = _copy_class_rows(
            model, state, target_names, source_names, source_labels, class_map, num_anchors, path
        )
    return report


def _copy_class_rows(model, state, target_names, source_names, source_labels, class_map, num_anchors, path):
    """For each ``target name -> source name or id``, the source class's rows of the output layer."""
    layer = model.head.classification_head.cls_logits
    source_weight, source_bias = state.get(f"{CLASS_OUTPUT}.weight"), state.get(f"{CLASS_OUTPUT}.bias")
    if source_weight is None or source_bias is None:
        raise ConfigError(f"model.init_class_map: {path} has no classification output layer to copy from")
    source_classes = source_bias.numel() // num_anchors
    target_classes = model.num_classes
    carried = []
    for target_name, source_key in class_map.items():
        if target_name not in target_names:
            raise ConfigError(
                f"model.init_class_map: {target_name!r} is not a class of the training set ({', '.join(target_names)})"
            )
        if source_names is not None and source_key in source_names:
            source_label = source_names.index(source_key)
        elif source_key.isdigit() and (source_labels is None or int(source_key) in source_labels):
            source_label = int(source_key) if source_labels is None else source_labels[int(source_key)]
        else:
            raise ConfigError(f"model.init_class_map: {source_key!r} is neither a class name nor a category id of {path}")
        if source_label >= source_classes:
            raise ConfigError(
                f"model.init_class_map: {source_key!r} is label {source_label}, but {path} has {source_classes} classes"
            )
        target_label = target_names.index(target_name)
        with torch.no_grad():
            for anchor in range(num_anchors):  # outputs are anchor-major: channel = anchor * classes + class
                layer.weight[anchor * target_classes + target_label] = source_weight[anchor * source_classes + source_label]
                layer.bias[anchor * target_classes + target_label] = source_bias[anchor * source_classes + source_label]
        carried.append((target_name, source_names[source_label] if source_names else source_key))
    return carried
