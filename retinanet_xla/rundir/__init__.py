"""The run directory: checkpoint files (atomic, ``weights_only``-loadable) and the
``checkpoints/`` folder, with the one rule every command uses for "the newest valid checkpoint"."""
