"""The ``retinanet-xla`` console script, and ``python -m retinanet_xla``.

It runs before torch and the command line are loaded, to settle what a C library reads only when
a process starts: on XLA's CPU client the process starts itself again, once, with glibc's huge
pages tunable (``xla/cpu_memory.py``: the step's scratch buffer is otherwise mapped and faulted
in 4 KiB at a time every step)."""

import os
import sys

from retinanet_xla.xla.cpu_memory import environment_for_huge_pages


def main() -> None:
    environment = environment_for_huge_pages(os.environ)
    if environment is not None and sys.executable:
        # The same interpreter, options and arguments (sys.orig_argv); the process keeps its
        # PID, so whoever started it still waits on it and signals it.
        os.execve(sys.executable, sys.orig_argv, environment)
    from retinanet_xla.cli import main as run_command_line

    run_command_line()


if __name__ == "__main__":
    main()
