"""``python -m retinanet_xla.distributed.torchrun ARGS``: torch's ``torchrun ARGS``, whose exit
status says what our processes said, so that the documented outer loop ("rerun while the exit
status is 75", docs/checkpoints.md) works under torchrun as under our own launch.

torchrun itself ends with status 1 whenever a process did not exit 0, and with a traceback when
it gets SIGTERM: a preemption would stop the loop at once. Here, a SIGTERM/SIGINT to the
launcher (which torchrun forwards to every process; each saves a checkpoint and exits 75) ends
with 75, and a run whose first failed process exited with a status (75, or 2 for a user's
mistake) ends with it; a process ended by a signal ends it with 1, as torchrun does. torchrun waits ``--shutdown-timeout`` seconds for its processes after a signal before it
kills them: give it longer than a checkpoint takes to write."""

import sys
from typing import List, Optional

from retinanet_xla.errors import EXIT_FAILED, EXIT_INTERRUPTED


def exit_status(first_failure: int) -> int:
    """The launcher's status: that of the first process to fail (75: stopped to be resumed; 2: a
    user's mistake, said once by the first process), whose failure made torchrun stop the
    others; 1 where a signal ended it."""
    return first_failure if first_failure > 0 else EXIT_FAILED


def main(argv: Optional[List[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except SignalException as stop:
        print(
            f"torchrun: stopped by {stop.sigval.name}; the processes saved their step: run the same command again to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except ChildFailedError as failed:
        return exit_status(failed.get_first_failure()[1].exitcode)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
