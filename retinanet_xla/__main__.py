"""The ``retinanet-xla`` console script, and ``python -m retinanet_xla``.

Before torch loads: torch imports every installed device backend that registers itself for
autoload (TorchTPU does), which on a machine without TPUs, or beside torch-xla, is a backend
that must not load. ``device/native/tpu.py`` imports TorchTPU when ``runtime.device`` is tpu."""

import os

os.environ.setdefault("TORCH_DEVICE_BACKEND_AUTOLOAD", "0")

from retinanet_xla.cli import main  # noqa: E402 - after the setting torch reads on import

if __name__ == "__main__":
    main()
