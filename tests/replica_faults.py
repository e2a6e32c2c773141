"""Replica functions for the launcher tests; a module of their own so that the process
``xmp.spawn`` starts can import them."""

import time


def fail_on_replica_1(runtime) -> None:
    """Replica 1 fails at once; replica 0 would wait far longer than the test allows (a sleep,
    not a collective, so that only the launcher can end it, not XLA's rendezvous timeout)."""
    if runtime.replicas.rank == 1:
        raise RuntimeError("injected failure")
    time.sleep(600)
