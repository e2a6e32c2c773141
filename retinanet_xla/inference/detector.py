"""The one inference sequence that evaluation, ``predict``, evaluation during training and
``export --check`` share: letterboxed images -> normalise -> model (under the precision it was
trained with) -> static-shape top-k candidates on the device -> per-class NMS and caps on the
host. ``export`` traces ``CandidateDetector``, the device half, into its artefacts."""

import contextlib
from typing import Callable, ContextManager, List, Optional, Tuple

import torch
from torch import Tensor, nn

from retinanet_xla.config import Config, PostprocessConfig
from retinanet_xla.device.runtime import Runtime
from retinanet_xla.errors import ConfigError
from retinanet_xla.models import RetinaNet
from retinanet_xla.models.footprint import GIB, inference_bytes
from retinanet_xla.ops import BoxCoder
from retinanet_xla.ops.postprocess import Candidates, Detections, filter_detections, select_candidates


class CandidateDetector(nn.Module):
    """Images [B, 3, H, W] (uint8 pixels, or already normalised floats) and the size of each
    image's content inside the canvas [B, 2] (height, width) -> the fixed-size candidates
    (boxes [B, K, 4], scores [B, K], labels [B, K], K = ``pre_nms_top_k``), sorted by score.
    Static shapes only: one compiled graph on XLA, and what StableHLO can express.

    ``forward_context`` wraps the model's forward alone (bf16 autocast when the model was
    trained so); the candidates are selected in float32."""

    def __init__(
        self,
        model: RetinaNet,
        image_size: Tuple[int, int],
        box_coder: BoxCoder,
        pre_nms_top_k: int,
        uint8_input: bool = True,
        forward_context: Callable[[], ContextManager] = contextlib.nullcontext,
    ):
        super().__init__()
        self.model, self.box_coder, self.pre_nms_top_k, self.uint8_input = model, box_coder, pre_nms_top_k, uint8_input
        self.forward_context = forward_context
        self.register_buffer("anchors", model.anchors(tuple(image_size)), persistent=False)

    def forward(self, images: Tensor, content_sizes: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        pixels = self.model.normalize(images) if self.uint8_input else images
        with self.forward_context():
            outputs = self.model(pixels)
        found = select_candidates(
            outputs["cls_logits"], outputs["bbox_regression"], self.anchors, self.box_coder, self.pre_nms_top_k, content_sizes
        )
        return found.boxes, found.scores, found.labels


def check_inference_memory(model: RetinaNet, runtime: Runtime, batch_size: int, image_size, precision: str) -> None:
    """``ConfigError`` when batches of ``batch_size`` images cannot fit (``models/footprint.py``)."""
    available = runtime.memory_bytes()
    if available is None:  # the backend cannot tell
        return
    needed = inference_bytes(model, batch_size, image_size, precision)
    if needed > available:
        height, width = image_size
        raise ConfigError(
            f"data.image_size [{height}, {width}] with {batch_size} image(s) per batch needs at least "
            f"{needed / GIB:.1f} GiB to run the model, and {available / GIB:.1f} GiB is available: lower "
            "data.image_size or eval.batch_size (--set)"
        )


class Detector:
    """``CandidateDetector`` on the runtime's device, then the host half of the
    post-processing: per image, detections in canvas pixels (``to_original_pixels`` maps them
    back). The model is put in eval mode for the call and restored after (evaluation during
    training passes the training model)."""

    def __init__(
        self,
        model: RetinaNet,
        config: Config,
        runtime: Runtime,
        batch_size: int,
        precision: Optional[str] = None,
        uint8_input: bool = True,
    ):
        """``batch_size``: the images of each call, checked to fit here, before any is loaded."""
        self.runtime, self.postprocess = runtime, config.eval
        precision = precision or config.train.precision
        check_inference_memory(model, runtime, batch_size, tuple(config.data.image_size), precision)
        box_coder = BoxCoder(config.model.box_coder_weights)
        image_size = tuple(config.data.image_size)
        self.candidates = CandidateDetector(
            model, image_size, box_coder, config.eval.pre_nms_top_k, uint8_input, lambda: runtime.autocast(precision)
        ).to(runtime.device)
        self._run_candidates = runtime.compile_inference(self.candidates)

    @torch.no_grad()
    def __call__(
        self, images: Tensor, content_sizes: Tensor, postprocess: Optional[PostprocessConfig] = None
    ) -> List[Detections]:
        """``images`` and ``content_sizes`` on the device; ``postprocess`` (default
        ``config.eval``) overrides the thresholds and caps, e.g. predict's score threshold."""
        model = self.candidates.model
        was_training = model.training
        model.eval()
        try:
            found = self._run_candidates(images, content_sizes)
            self.runtime.end_step(collective=False)  # an evaluation batch holds no collective
        finally:
            model.train(was_training)
        return filter_detections(Candidates(*found), postprocess or self.postprocess)
