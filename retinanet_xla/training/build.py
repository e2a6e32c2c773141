"""The training step from a config: loss, optimizer, schedule and the model on the device."""

import threading
from typing import Callable, Optional

import torch
from torch import nn

from retinanet_xla.config import Config
from retinanet_xla.device.runtime import Runtime
from retinanet_xla.errors import ConfigError
from retinanet_xla.models import build_model, set_replica_averaging
from retinanet_xla.ops import AnchorMatcher, BoxCoder, DetectionLoss
from retinanet_xla.training.ema import WeightAverage
from retinanet_xla.training.memory import check_step_memory
from retinanet_xla.training.optimizer import LearningRateSchedule, build_optimizer
from retinanet_xla.training.state import TrainState
from retinanet_xla.training.step import TrainStep


def build_loss(config: Config) -> DetectionLoss:
    m, loss = config.model, config.loss
    matcher = AnchorMatcher(
        m.matcher.positive_threshold,
        m.matcher.negative_threshold,
        m.matcher.allow_low_quality_matches,
        m.matcher.crowd_ioa_threshold,
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


# Replicas that are threads of one process share torch's global RNG: each builds its model
# from the seed while holding this lock, so every replica starts from identical weights.
_INIT_LOCK = threading.Lock()


def build_train_step(
    config: Config, runtime: Runtime, max_boxes: int, initialize: Optional[Callable[[nn.Module], None]] = None
) -> TrainStep:
    """Model, loss, optimizer and schedule on the device, wrapped in the compiled step, for
    batches of ``max_boxes`` ground-truth boxes per image (``data.max_boxes`` resolved). Ends
    with a sync so that weights, buffers and optimizer state are device data before step 1 and
    step 1 traces the same graph as every later step (docs/architecture.md, "Scalar buffers")."""
    with _INIT_LOCK:
        torch.manual_seed(config.train.seed)
        model = build_model(config)
    if not any(parameter.requires_grad for parameter in model.parameters()):
        m = config.model
        raise ConfigError(
            f"model.trainable {m.trainable} with model.backbone.freeze_at {m.backbone.freeze_at} leaves no parameter "
            "to train: add fpn or head to model.trainable, or lower freeze_at"
        )
    check_step_memory(model, config, runtime, max_boxes)
    if initialize is not None:  # a trained detector's weights (model.init_from), on the host
        initialize(model)
    ema = None
    if config.train.ema_decay > 0:
        average = build_model(config)
        average.load_state_dict(model.state_dict())
        ema = WeightAverage(runtime.place_model(model), runtime.place_model(average), config.train.ema_decay)
    model = runtime.place_model(model).train()
    loss_fn = build_loss(config).to(runtime.device).train()
    # Across replicas: the positives normaliser and cross-replica BatchNorm statistics are
    # averaged inside the graph, and so are the gradients before the update.
    replicas = runtime.replicas
    loss_fn.average_across_replicas = replicas.mean
    set_replica_averaging(model, replicas.differentiable_mean, replicas.world)
    anchors = model.anchors(tuple(config.data.image_size)).to(runtime.device)
    optimizer = build_optimizer(model, config.train.optimizer, runtime.update_style())
    state = TrainState(model, loss_fn, optimizer, ema, runtime.device)
    schedule = LearningRateSchedule(config.train.schedule, config.train.steps)
    step = TrainStep(state, schedule, anchors, runtime, config.train.precision, config.train.grad_clip_norm)
    # Loaded weights (ImageNet files, model.init_from) bring scalar buffers of equal values,
    # the BatchNorm step counters, which torch_xla would share as one device buffer: step 2
    # would then compile again (docs/architecture.md, "Scalar buffers").
    # AdamW's per-parameter step counts are such scalars too.
    runtime.prepare_state(state.tensors())
    # Replicas that are threads of one process take turns (as for a collective graph), so the
    # first compiles this graph and the others find it compiled, instead of all compiling it.
    runtime.end_step()
    return step
