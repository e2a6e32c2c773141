"""retinanet-xla: a static-shape RetinaNet trainer for PyTorch/XLA (TPU, and CPU for CI)."""

__version__ = "0.1.0"

from retinanet_xla.models.retinanet import RetinaNet  # noqa: E402

__all__ = ["RetinaNet", "__version__"]
