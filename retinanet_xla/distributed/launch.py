"""Starting one replica per local device, and the one way every command does it (detectron2's
``launch``: the replica's function is the same for one device or many).

The backend starts the replicas (``Runtime.spawn``: on torch-xla, ``xmp.spawn``, one process per
TPU chip, or on the CPU client one child process with a thread per device; on a native device,
one process per device joined by ``torch.distributed``) and gives each its runtime
(``Runtime.in_spawned_replica``); this module owns what is the same for every backend:
signals, failures and the master's result.

A replica that fails ends its whole process at once (``os._exit``): the others would otherwise
wait in the next collective for a partner that never comes.
"""

import contextlib
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
from typing import Any, Callable, ContextManager, Dict

from retinanet_xla.config import RuntimeConfig
from retinanet_xla.device.choice import LaunchPlan
from retinanet_xla.device.runtime import Runtime
from retinanet_xla.errors import STOP_SIGNALS, RunFailed, UserError
from retinanet_xla.logs import configure_logging


class ReplicaFailed(RunFailed):
    """A replica process ended abnormally; the replica printed its own error first."""


def run_on_local_replicas(
    function: Callable[..., Any],
    args: tuple,
    plan: LaunchPlan,
    agreed_errors: tuple = (),
    prepare: Callable[[], ContextManager] = contextlib.nullcontext,
) -> Any:
    """``function(runtime, *args)`` on every local replica (``plan``: ``runtime.device`` and
    ``runtime.num_devices`` resolved), in this process when there is one; returns what the master's
    call returned (through a JSON file when the replicas run in a child process), and None in
    the other processes of a run started by ``torchrun`` (one replica each): only the master
    reports. Callers check what must hold for every replica (batch sizes) first.

    ``prepare()`` is entered once per run, before any replica starts and until they all end:
    what a run does once (its lock, the files every replica reads). Under an external launcher
    every process is one replica and runs this command: the master alone enters it, and the
    others wait for it at a barrier (a master that fails there ends the launcher's group)."""
    if plan.external:  # one local replica
        runtime = plan.runtime_here()
        with prepare() if runtime.replicas.is_master else contextlib.nullcontext():
            runtime.replicas.barrier()
            value = function(runtime, *args)
        return value if runtime.replicas.is_master else None
    with prepare():
        if plan.local_replicas == 1:
            return function(plan.runtime_here(), *args)
        with tempfile.TemporaryDirectory(prefix="retinanet-xla-replicas-") as scratch:
            result = Path(scratch) / "master.json"
            launch(plan.backend, plan.settings, _return_from_master, (function, args, result), agreed_errors)
            return json.loads(result.read_text())


def _return_from_master(runtime: Runtime, function: Callable[..., Any], args: tuple, result: Path) -> None:
    value = function(runtime, *args)
    if runtime.replicas.is_master:
        result.write_text(json.dumps(value))


def _replica_entry(
    index: int, backend: type, settings: RuntimeConfig, function: Callable, args: tuple, agreed_errors: tuple
) -> None:
    """Run one replica. ``agreed_errors`` are raised by every replica at the same step and go
    back to the launcher; anything else ends the whole process at once with a message."""
    configure_logging()
    runtime = backend.in_spawned_replica(settings, index)
    try:
        function(runtime, *args)
    except agreed_errors:
        raise
    except BaseException as error:  # noqa: BLE001 - every other failure must end every replica
        if isinstance(error, (UserError, RunFailed)):  # their message is the whole story
            print(f"error: {error}", file=sys.stderr, flush=True)
        else:
            rank = runtime.replicas.rank
            print(f"error: replica {rank} failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            traceback.print_exc()
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(error.exit_code if isinstance(error, (UserError, RunFailed)) else RunFailed.exit_code)


def launch(backend: type, settings: RuntimeConfig, function: Callable, args: tuple, agreed_errors: tuple = ()) -> None:
    """``function(runtime, *args)`` on every local device, started by ``backend.spawn``.

    The replica processes start with SIGTERM and SIGINT ignored (a TPU VM's preemption notice
    reaches every process): the launcher alone handles them, with the handlers it had before
    the call, and the replicas learn of a stop through the ``STOP`` file those handlers write.
    """
    outcome: Dict[str, BaseException] = {}

    def spawn() -> None:
        try:
            backend.spawn(_replica_entry, (backend, settings, function, args, agreed_errors), settings)
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = error

    in_main_thread = threading.current_thread() is threading.main_thread()
    handlers = {number: signal.signal(number, signal.SIG_IGN) for number in STOP_SIGNALS} if in_main_thread else {}
    launcher = threading.Thread(target=spawn, name="replicas", daemon=True)
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
