"""The distributed layer: replicas and their collectives, starting them, the order in which
replicas that are threads of one process launch collective graphs, and stop requests."""
