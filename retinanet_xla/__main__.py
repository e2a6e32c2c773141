"""The ``retinanet-xla`` console script, and ``python -m retinanet_xla``."""

from retinanet_xla.cli import main

if __name__ == "__main__":
    main()
