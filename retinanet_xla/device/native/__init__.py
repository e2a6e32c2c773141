"""The native implementation of the device layer: PyTorch's own devices (CPU, CUDA, TorchTPU),
the step run eagerly or compiled by ``torch.compile``, replicas as processes joined by
``torch.distributed``."""
