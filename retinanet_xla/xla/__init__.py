"""The device layer: the XLA (or eager) runtime a step runs on, feeding batches to it, and the
kernels XLA's CPU backend needs in place of its slow lowerings. Knows nothing of replicas."""
