"""retinanet-xla: a static-shape RetinaNet trainer for PyTorch/XLA (TPU, and CPU for CI)."""

__version__ = "0.1.0"

__all__ = ["Predictor", "RetinaNet", "__version__"]


def __getattr__(name: str):
    # Imported on first use, not with the package: the console script's launcher
    # (``__main__.py``) decides on its process's environment before torch is loaded.
    if name == "RetinaNet":
        from retinanet_xla.models.retinanet import RetinaNet

        return RetinaNet
    if name == "Predictor":
        from retinanet_xla.inference.predictor import Predictor

        return Predictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
