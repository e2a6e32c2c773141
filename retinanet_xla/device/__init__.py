"""The device layer: one ``Runtime`` interface (``runtime.py``) with one implementation per
execution model (``xla/``: torch-xla's lazy tensors; ``native/``: PyTorch's own CPU, CUDA or
TorchTPU devices, eager or ``torch.compile``), and the choice between them (``choice.py``), made
once per command (``plan_launch``). Knows nothing of training, data or commands."""
