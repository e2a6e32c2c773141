"""The torch-xla implementation of the device layer: its runtime and replica group, graph
replay, the background batch feed, the launch order of replicas that are threads, and the
kernels XLA's CPU backend needs in place of its slow lowerings."""
