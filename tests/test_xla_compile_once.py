"""The core promise: on an XLA device the training computation is one graph, whatever the boxes."""

import pytest
import torch

from retinanet_xla import RetinaNet
from retinanet_xla.ops import DetectionLoss

pytestmark = pytest.mark.xla

IMAGE_SIZE = (64, 64)
MAX_BOXES = 4
NUM_CLASSES = 3


def make_batch(boxes_per_image, seed):
    generator = torch.Generator().manual_seed(seed)
    batch = len(boxes_per_image)
    boxes = torch.zeros(batch, MAX_BOXES, 4)
    labels = torch.full((batch, MAX_BOXES), -1)
    for image, count in enumerate(boxes_per_image):
        for slot in range(count):
            xy = torch.rand(2, generator=generator) * 40
            wh = torch.rand(2, generator=generator) * 20 + 4
            boxes[image, slot] = torch.cat([xy, xy + wh])
            labels[image, slot] = slot % NUM_CLASSES
    crowd = torch.zeros(batch, MAX_BOXES, dtype=torch.bool)
    crowd[0, 0] = boxes_per_image[0] > 0
    images = torch.randint(0, 256, (batch, 3, *IMAGE_SIZE), dtype=torch.uint8, generator=generator)
    return images, boxes, labels, crowd


def loss_and_grads(model, loss_fn, anchors, batch):
    images, boxes, labels, crowd = batch
    model.zero_grad(set_to_none=True)
    losses = loss_fn(model(model.normalize(images)), anchors, boxes, labels, crowd)
    losses["loss"].backward()
    return losses, [p.grad for p in model.parameters() if p.requires_grad]


def cpu_fallback_counts(metrics) -> dict:
    return {name: metrics.counter_value(name) for name in metrics.counter_names() if name.startswith("aten::")}


# Gradient agreement with eager, relative to each gradient's norm. MobileNetV2's 52 BatchNorm
# layers, whose statistics here come from 2 images of 64x64 (2x2 maps at stride 32), amplify
# fp32 rounding in the early layers' gradients to a few percent; the losses agree to 1e-4.
GRADIENT_TOLERANCE = {"resnet18": 1e-2, "mobilenet_v2": 1e-1}


@pytest.mark.parametrize("backbone", sorted(GRADIENT_TOLERANCE))
def test_forward_loss_backward_compiles_once_and_matches_eager(backbone):
    import torch_xla
    import torch_xla.debug.metrics as metrics

    torch.manual_seed(0)
    cpu_model = RetinaNet(NUM_CLASSES, backbone=backbone, fpn_channels=32, head_convs=1, backbone_norm="bn", freeze_at=1).train()
    cpu_loss = DetectionLoss(NUM_CLASSES, box_loss="smooth_l1", box_loss_beta=0.1)
    device = torch_xla.device()
    model = RetinaNet(NUM_CLASSES, backbone=backbone, fpn_channels=32, head_convs=1, backbone_norm="bn", freeze_at=1)
    model.load_state_dict(cpu_model.state_dict())
    model = model.to(device).train()
    loss_fn = DetectionLoss(NUM_CLASSES, box_loss="smooth_l1", box_loss_beta=0.1).to(device)
    anchors = model.anchors(IMAGE_SIZE).to(device)
    # Materialise the transferred weights: scalar buffers (num_batches_tracked = 0) would
    # otherwise enter the first graph as constants and the second as inputs.
    torch_xla.sync()

    fallbacks_before = cpu_fallback_counts(metrics)
    compiles_before = metrics.metric_data("CompileTime")[0] if metrics.metric_data("CompileTime") else 0
    compiles = []
    for seed, boxes_per_image in enumerate([(0, MAX_BOXES), (2, 1), (MAX_BOXES, 0)]):
        batch = make_batch(boxes_per_image, seed)
        losses, grads = loss_and_grads(model, loss_fn, anchors, [t.to(device) for t in batch])
        torch_xla.sync()
        compiles.append(metrics.metric_data("CompileTime")[0])
        expected, expected_grads = loss_and_grads(cpu_model, cpu_loss, model.anchors(IMAGE_SIZE), batch)
        for key in ("loss", "cls_loss", "box_loss", "num_foreground"):
            torch.testing.assert_close(losses[key].cpu(), expected[key], rtol=1e-4, atol=1e-4)
        for grad, expected_grad in zip(grads, expected_grads):
            # The floor is for gradients that are zero up to rounding (a bias before BatchNorm).
            difference = (grad.cpu() - expected_grad).norm()
            bound = GRADIENT_TOLERANCE[backbone] * expected_grad.norm() + 1e-4
            assert difference <= bound, f"gradient differs from eager by {difference:.2e} (norm {expected_grad.norm():.2e})"

    assert compiles[0] > compiles_before
    assert compiles[1] == compiles[0], "the second step compiled a new graph"
    assert compiles[2] == compiles[0], "the third step compiled a new graph"
    # Ops without an XLA lowering run on the CPU and split the step into several graphs. (The
    # counters are process-wide: other tests read values with .item(), which counts as one.)
    assert cpu_fallback_counts(metrics) == fallbacks_before
