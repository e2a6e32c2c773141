"""The torch-xla implementation of the device layer: its runtime and replica group, graph
replay, the background batch feed and the launch order of replicas that are threads."""
