"""The device layer: one ``Runtime`` interface (``runtime.py``) with one implementation per
execution model (``xla/``: torch-xla; ``eager.py``: eager CPU or CUDA), and the choice between
them (``choice.py``). Knows nothing of training, data or commands."""
