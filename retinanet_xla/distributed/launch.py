"""Starting one replica per local XLA device, and the one way every command does it.

``xmp.spawn`` starts one process per TPU chip (per host) and, inside it, one thread per device
it addresses; on the CPU client (``PJRT_DEVICE=CPU CPU_NUM_DEVICES=N``) one child process with
N threads. When the replicas are threads of one process, they launch each collective graph in
rank order (``launch_order.LaunchOrder``), so that it is compiled once and its collectives match.

A replica that fails ends its whole process at once (``os._exit``): the others would otherwise
wait in the next all-reduce for a partner that never comes.
"""

import json
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from retinanet_xla.config import Config
from retinanet_xla.distributed.launch_order import launch_order
from retinanet_xla.distributed.replicas import Replicas, current_replicas
from retinanet_xla.errors import STOP_SIGNALS, RunFailed, UserError
from retinanet_xla.xla.runtime import Runtime, prefer_nonblocking_cpu_client, resolve_device


class ReplicaFailed(RunFailed):
    """A replica process ended abnormally; the replica printed its own error first."""


def replica_runtime(config: Config, replicas: Replicas = Replicas()) -> Runtime:
    """The device runtime of one replica; replicas that are threads of this process share the
    order in which they launch graphs with collectives."""
    order = launch_order(replicas.world) if replicas.threaded and replicas.world > 1 else None
    return Runtime(config.runtime.device, config.runtime.compile_cache, replicas.rank, order, config.runtime.step_graph)


def run_on_local_replicas(function: Callable[..., Any], args: tuple, config: Config, agreed_errors: tuple = ()) -> Any:
    """``function(replicas, *args)`` on every local replica (``runtime.device``,
    ``runtime.num_devices``), in this process when there is one; returns what the master's
    call returned (through a JSON file when the replicas run in a child process). Callers check
    what must hold for every replica (batch sizes) and write shared data before calling."""
    if local_replica_count(config.runtime.device, config.runtime.num_devices) == 1:
        return function(Replicas(), *args)
    with tempfile.TemporaryDirectory(prefix="retinanet-xla-replicas-") as scratch:
        result = Path(scratch) / "master.json"
        launch(_return_from_master, (function, args, result), agreed_errors, config.runtime.num_devices)
        return json.loads(result.read_text())


def _return_from_master(replicas: Replicas, function: Callable[..., Any], args: tuple, result: Path) -> None:
    value = function(replicas, *args)
    if replicas.is_master:
        result.write_text(json.dumps(value))


def _replica_entry(index: int, function: Callable, args: tuple, agreed_errors: tuple) -> None:
    """Run one replica. ``agreed_errors`` are raised by every replica at the same step and go
    back to the launcher; anything else ends the whole process at once with a message."""
    replicas = current_replicas()
    try:
        function(replicas, *args)
    except agreed_errors:
        raise
    except BaseException as error:  # noqa: BLE001 - every other failure must end every replica
        if isinstance(error, (UserError, RunFailed)):  # their message is the whole story
            print(f"error: {error}", file=sys.stderr, flush=True)
        else:
            print(f"error: replica {replicas.rank} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(error.exit_code if isinstance(error, (UserError, RunFailed)) else RunFailed.exit_code)


def local_replica_count(device: str, num_devices: Optional[int]) -> Optional[int]:
    """How many replicas a command runs on this host (``runtime.device``,
    ``runtime.num_devices``), when it can be known without starting the runtime (the launcher
    must not touch the device before ``xmp.spawn``): 1 off XLA; on the CPU client,
    ``num_devices`` or else ``CPU_NUM_DEVICES``; on TPU, ``num_devices``, or None for all of the
    host's."""
    if resolve_device(device) != "xla":
        return 1
    if num_devices is not None or os.environ.get("PJRT_DEVICE", "CPU").upper() != "CPU":
        return num_devices
    return int(os.environ.get("CPU_NUM_DEVICES", "1"))


def launch(function: Callable, args: tuple, agreed_errors: tuple = (), num_devices: Optional[int] = None) -> None:
    """``function(replicas, *args)`` on every local XLA device, through ``xmp.spawn``.

    The replica processes start with SIGTERM and SIGINT ignored (a TPU VM's preemption notice
    reaches every process): the launcher alone handles them, with the handlers it had before
    the call, and the replicas learn of a stop through the ``STOP`` file those handlers write.
    """
    import torch_xla.distributed.xla_multiprocessing as xmp

    if num_devices is not None and os.environ.get("PJRT_DEVICE", "CPU").upper() == "CPU":
        os.environ["CPU_NUM_DEVICES"] = str(num_devices)  # the CPU client's device count
    prefer_nonblocking_cpu_client()  # the replica process creates its client before any Runtime
    outcome: Dict[str, BaseException] = {}

    def spawn() -> None:
        try:
            xmp.spawn(_replica_entry, args=(function, args, agreed_errors))
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = error

    in_main_thread = threading.current_thread() is threading.main_thread()
    handlers = {number: signal.signal(number, signal.SIG_IGN) for number in STOP_SIGNALS} if in_main_thread else {}
    launcher = threading.Thread(target=spawn, name="xmp.spawn", daemon=True)
    before = set(multiprocessing.active_children())
    try:
        launcher.start()
        # Ignored signals stay ignored across fork and exec: restore ours once the process exists.
        while launcher.is_alive() and not set(multiprocessing.active_children()) - before:
            time.sleep(0.01)
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    while launcher.is_alive():
        launcher.join(0.1)  # short waits, so that this thread runs the signal handlers
    error = outcome.get("error")
    if isinstance(error, BrokenProcessPool):
        for process in multiprocessing.active_children():  # no replica process outlives the run
            process.kill()
        raise ReplicaFailed(
            "a replica process ended abnormally (its error is printed above); checkpoints already written are intact"
        )
    if error is not None:
        raise error
